"""Checks that two parents can be merged: same class and configuration (up to keys that do not matter)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hf_mudsc.errors import MergeInputError

# Config fields that may differ between two parents of one architecture (labels and bookkeeping).
_IGNORED_CONFIG_KEYS = {
    "id2label", "label2id", "num_labels", "_name_or_path", "name_or_path", "transformers_version",
    "dtype", "torch_dtype", "problem_type", "finetuning_task", "architectures", "task_label_ranges",
    "mudsc", "_commit_hash", "output_attentions", "output_hidden_states", "return_dict",
    "auto_map", "custom_pipelines",
}

# Config fields that never change what a merged encoder computes in eval mode: initialisation (`initializer_range`,
# `initializer_factor`, CLIP's `logit_scale_init_value`: the trained `logit_scale` is a weight), training and export
# switches (`gradient_checkpointing`, left in old configs such as bert-base-uncased's; `torchscript`), a decoder's
# cache (`use_cache`, `output_past`: the adapters merge encoders), hints for other tools (`tokenizer_class`, `prefix`,
# `task_specific_params`) and fields only a head class no adapter merges reads (`tie_word_embeddings`: an LM head;
# `encoder_stride`: ViTForMaskedImageModeling's decoder — a tied head would also differ in its tensors, which
# `parameter_difference` refuses). Parents may differ in them (two fine-tunes saved by other transformers releases
# do); the merged config keeps parent A's, as for dropout rates.
# Not `chunk_size_feed_forward`: a chunked MLP runs once per chunk, so its hooks fire per chunk; parents differing in
# it crashed the statistics pass, and are refused (the merge's passes run whole sequences: `objects.whole_sequences`).
_NOT_COMPUTED_CONFIG_KEYS = frozenset({
    "initializer_range", "initializer_factor", "logit_scale_init_value", "gradient_checkpointing", "torchscript",
    "use_cache", "output_past", "tokenizer_class", "prefix", "task_specific_params", "tie_word_embeddings",
    "encoder_stride",
    # ELECTRA's sequence summary (read by ElectraForMultipleChoice only) and DistilBERT's `tie_weights_` (read by
    # nothing in transformers 5)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "tie_weights_",
})

#: Fields older transformers releases wrote into every config that transformers 5 no longer writes (a fine-tune saved
#: by 4.x names `position_embedding_type`, one by 2.x `use_bfloat16` / `pruned_heads` / `is_decoder`; the same model
#: saved by 5, or its base, does not): a config without one reads as that release's value, which the installed
#: classes assume (`check_encoder_config` refuses any position_embedding_type but "absolute").
LEGACY_DEFAULTS: Mapping[str, object] = {
    "position_embedding_type": "absolute", "use_bfloat16": False, "pruned_heads": {}, "is_decoder": False,
}


#: How a model returns its outputs, as `from_pretrained(path, return_dict=False, output_hidden_states=True)` sets it on
#: that object's config (its defaults here): a switch of one loaded object, not of the checkpoint (the merged config
#: gets the defaults: `apply.build.with_stock_outputs`; an object's config is compared without them:
#: `objects.holds_config`).
OUTPUT_SWITCHES = {"return_dict": True, "output_hidden_states": False, "output_attentions": False}


# Config keys that point at code in a parent's repo (`trust_remote_code` classes and pipelines). The merged
# model is a stock transformers class; copying them would make it point users at code it was never built with.
REMOTE_CODE_CONFIG_KEYS = ("auto_map", "custom_pipelines")


# Config fields only a head reads (a dropout before a classifier, whether an LM head shares the embeddings, the stride
# of ViT's masked-image-modeling decoder): a base of another head class may differ in them from its fine-tunes.
HEAD_CONFIG_KEYS = frozenset({"classifier_dropout", "tie_word_embeddings", "encoder_stride"})


def config_mismatch(who: str, differences: Sequence[str]) -> str:
    """The refusal of parents whose configs differ (`who`: how they are named) — the fields change shapes or what
    each parent computes — listing the first ten `differences`."""
    listed = "; ".join(differences[:10]) + ("; ..." if len(differences) > 10 else "")
    return (f"{who} have different configurations, which one merged model cannot hold both of: {listed}. Merge models "
            "fine-tuned from the same architecture configuration (a difference you accept, e.g. layer_norm_eps: give "
            "both parents one value in a copy of a folder's config.json)")


def training_only(key: str) -> bool:
    """Whether a config field only acts in training (dropout rates: a merge and the merged model run in eval mode),
    so parents may differ in it; the merged config keeps parent A's."""
    return "dropout" in key


def config_differences(a: PretrainedConfig, b: PretrainedConfig, prefix: str = "", *,
                       ignored: Collection[str] = ()) -> list[str]:
    """`key: a vs b` for each field that differs, labels, bookkeeping, dropout rates and fields no eval-mode forward
    reads (`_NOT_COMPUTED_CONFIG_KEYS`) aside (and the `ignored` fields)."""
    skip = _IGNORED_CONFIG_KEYS | _NOT_COMPUTED_CONFIG_KEYS | set(ignored)
    compared = lambda key: key not in skip and not training_only(key)  # noqa: E731
    return _differences(a, b, compared, compared, prefix)


def not_computed_differences(a: PretrainedConfig, b: PretrainedConfig) -> list[str]:
    """`key: a vs b` for each field no eval-mode forward reads (`_NOT_COMPUTED_CONFIG_KEYS`) that differs: what
    `config_differences` lets parents differ in, and the merged config takes from parent A — said, not refused."""
    return _differences(a, b, lambda key: key in _NOT_COMPUTED_CONFIG_KEYS,
                        lambda key: key not in _IGNORED_CONFIG_KEYS and not training_only(key))


def _differences(a: PretrainedConfig, b: PretrainedConfig, compared: Callable[[str], bool],
                 descend: Callable[[str], bool], prefix: str = "") -> list[str]:
    """`key: a vs b` for each `compared` field that differs, and for each `compared` field of the sub-configs
    (`text_config`) to `descend` into, named `key.sub`."""
    da, db = a.to_dict(), b.to_dict()
    problems = []
    for key in sorted(set(da) | set(db)):
        va, vb = da.get(key, LEGACY_DEFAULTS.get(key)), db.get(key, LEGACY_DEFAULTS.get(key))
        if isinstance(va, dict) and isinstance(vb, dict) and key.endswith("_config"):
            if not descend(key):
                continue
            sub_a = {k: v for k, v in va.items() if compared(k)}
            sub_b = {k: v for k, v in vb.items() if compared(k)}
            for sub in sorted(set(sub_a) | set(sub_b)):
                value_a, value_b = sub_a.get(sub, LEGACY_DEFAULTS.get(sub)), sub_b.get(sub, LEGACY_DEFAULTS.get(sub))
                if value_a != value_b:
                    problems.append(f"{prefix}{key}.{sub}: {value_a!r} vs {value_b!r}")
        elif compared(key) and va != vb:
            problems.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return problems


#: How a refusal of a checkpoint whose config.json gives other tensors or shapes than its weights ends (the loader's
#: and the dry run's).
CONFIG_WEIGHTS_FIX = ("The config names another architecture or other sizes than the checkpoint was saved with; "
                      "restore the config.json saved with these weights (save_pretrained writes both)")


def config_weights_refusal(reference: str, file: str, class_name: str, missing: Sequence[str],
                           mismatched: Sequence[tuple[str, Sequence[int], Sequence[int]]],
                           unused: Sequence[str] = (), unused_count: int = 0) -> str:
    """The one line refusing a checkpoint its config.json does not describe: tensors the config's class needs that
    are missing, tensors of other shapes (`(name, stored, expected)`), and — named beside them — unused ones (`unused`:
    a few stored names, `unused_count`: how many). The loader and the dry run (which reads only the headers) say it
    in the same words."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the {class_name} of config.json needs are missing "
                        f"(e.g. {', '.join(map(repr, missing[:3]))})")
    if unused:
        problems.append(f"{unused_count} tensors of the checkpoint are unused (e.g. {', '.join(map(repr, unused))})")
    if mismatched:
        key, stored, expected = mismatched[0]
        problems.append(f"{len(mismatched)} tensors have other shapes than config.json says (e.g. {key!r} is "
                        f"{tuple(stored)} in the checkpoint but {tuple(expected)} per config.json)")
    return (f"{reference!r}: config.json does not describe the weights in {file}: " + "; ".join(problems) + ". "
            + CONFIG_WEIGHTS_FIX)


def stock_class(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The transformers model class `cls` is or derives from (the first class of its MRO defined in transformers
    that is a model, not an abstract base such as `ViTPreTrainedModel`): a merged model is built as that class, as
    `from_pretrained` gives it back — a user's subclass (its own `forward`) would run otherwise in memory than its
    saved copy, whose `architectures` would name a class transformers does not know. A class built directly on an
    abstract base (its own modules and head) is its own stock class: nothing in transformers holds its modules."""
    for candidate in cls.__mro__:
        if not (candidate.__module__.startswith("transformers.") and issubclass(candidate, PreTrainedModel)):
            continue
        if candidate is PreTrainedModel or candidate.__name__.endswith("PreTrainedModel"):
            return cls  # only abstract bases above: the user's class holds the modules
        return candidate
    return cls


def same_class_fix(class_a: str) -> str:
    """How a refusal of parents of different classes ends: the fix, with parent A's class (`class_a`) as example."""
    return f"merge models of the same class (e.g. all {class_a})"


def parameter_difference(names_a: Sequence[str], names_b: Sequence[str]) -> tuple[str, bool] | None:
    """The first parameter one parent holds and the other has not, as (name, whether parent A is the one holding it):
    A's names in A's order first, then B's; None when both hold the same names. Parents of one class and config can
    still differ so (constructor choices the config does not record, e.g. `add_pooling_layer=False`), and a merge
    of the two would fail on, or silently drop, what only one holds."""
    held_b = set(names_b)
    for name in names_a:
        if name not in held_b:
            return name, True
    held_a = set(names_a)
    for name in names_b:
        if name not in held_a:
            return name, False
    return None


def structure_mismatch(name_a: str, name_b: str, parameter: str, a_holds: bool, class_a: str) -> str:
    """The refusal of two parents (named `name_a`, `name_b` in messages) of class `class_a` whose parameters differ
    (`parameter_difference`: `parameter`, held by A or by B). A pooler held by one only gets the fix for it."""
    module = parameter.rpartition(".")[0] or parameter
    holder, other = (name_a, name_b) if a_holds else (name_b, name_a)
    if "pooler" in module.split("."):
        return (f"{holder} has a pooler ({module!r}) and {other} has none: one merged model cannot hold both; load "
                f"both the same way (e.g. {class_a}.from_pretrained(path, add_pooling_layer=False) for both, then pass "
                "the models or save_pretrained them)")
    return (f"{name_b} {'lacks' if a_holds else 'holds'} {parameter!r} (module {module!r}), which {name_a} "
            f"{'holds' if a_holds else 'has not'}: the parents are {class_a}s built with other constructor arguments "
            "and one merged model cannot hold both; build both parents the same way")


def is_regression_head(config: PretrainedConfig) -> bool:
    """Whether a classifier class with this config is a regression head — transformers' own rule: problem_type
    "regression", or one output when no problem_type is set (trained with a squared error, not a softmax). A
    one-label head whose config says multi_label_classification is a sigmoid, not a regression."""
    problem_type = getattr(config, "problem_type", None)
    return problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", None) == 1)


def is_multi_label_head(config: PretrainedConfig) -> bool:
    """Whether a classifier class with this config reads its logits by a sigmoid per label (problem_type
    "multi_label_classification"), not one softmax."""
    return getattr(config, "problem_type", None) == "multi_label_classification"


def is_one_class_softmax_head(config: PretrainedConfig) -> bool:
    """Whether the config says single-label classification of one class (problem_type "single_label_classification"
    with num_labels=1): a softmax over one logit is 1 on every input, and transformers refuses to load such a
    config.json (it asks for num_labels > 1) — a config edited on a model object after it was built can hold it."""
    return (getattr(config, "problem_type", None) == "single_label_classification"
            and getattr(config, "num_labels", None) == 1)


def is_softmax_head(config: PretrainedConfig) -> bool:
    """Whether a classifier class with this config reads its logits through one softmax (single-label
    classification), so that shifting a row of them changes nothing: not a regression head, nor a multi-label one
    (a sigmoid per label)."""
    return not is_regression_head(config) and not is_multi_label_head(config)


def check_parents(model_a: PreTrainedModel, model_b: PreTrainedModel, labels: tuple[str, str] = ("A", "B")) -> None:
    """Refuse parents that cannot share one permutation spec, before any heavy work. `labels` name the two parents
    in messages (with N parents the pipeline checks parent A against each other parent: B, C, ...)."""
    label_a, label_b = labels
    for name, model in ((label_a, model_a), (label_b, model_b)):
        if not isinstance(model, PreTrainedModel):
            raise MergeInputError(
                f"parent {name} is a {type(model).__name__}; pass a transformers PreTrainedModel or a local folder"
            )
    if type(model_a) is not type(model_b):
        raise MergeInputError(
            f"parents have different architectures: {label_a} is {type(model_a).__name__}, "
            f"{label_b} is {type(model_b).__name__}; {same_class_fix(type(model_a).__name__)}"
        )
    differences = config_differences(model_a.config, model_b.config)
    if differences:
        raise MergeInputError(config_mismatch(f"parent {label_a} and parent {label_b}", differences))
    names = ([name for name, _ in model_a.named_parameters()], [name for name, _ in model_b.named_parameters()])
    difference = parameter_difference(*names)
    # Parents whose names the loader could not read before loading (pickle checkpoints) are checked here, as loaded.
    if difference is not None:
        raise MergeInputError(structure_mismatch(f"parent {label_a}", f"parent {label_b}", *difference,
                                                 type(model_a).__name__))
    # NaN/inf weights are refused by the relation check (`relation.parent_relation`), which reads every tensor of
    # every parent anyway — before calibration, and for `auto` before any parent is loaded whole — not by a pass of
    # its own here (a lazily read parent's tensors would be read from disk one more time for it).


def non_finite_refusal(who: str, name: str) -> MergeInputError:
    """The one line refusing `who` (e.g. "parent B") for NaN or infinite values in its tensor `name`."""
    return MergeInputError(f"{who} has NaN or infinite values in {name!r}; the checkpoint is corrupt or "
                           "diverged in training — fix or re-export it before merging")


def check_finite(parameters: Mapping[str, torch.Tensor], who: str) -> None:
    """Refuse NaN or infinite weights (one tensor at a time: lazily read parameters stay lazy). Parameters on the
    meta device (a lazily read parent's model) carry no values: their `LazyParameters` are checked instead. Read
    without gradients: parameters made under `torch.inference_mode()` cannot enter a graph."""
    for param_name, param in parameters.items():
        if not param.is_floating_point() or param.is_meta:
            continue
        with torch.no_grad():
            finite = bool(torch.isfinite(param).all())
        if not finite:
            raise non_finite_refusal(who, param_name)


def check_gradients_possible(named: Sequence[tuple[str, torch.nn.Module]], method: str) -> None:
    """Refuse, in one line before any work, parents (`(name, model)` pairs) whose parameters are inference tensors
    (made under `torch.inference_mode()`) for a `method` that takes gradients of them: autograd cannot record them,
    and the failure would come late, from inside the gradient pass."""
    for name, model in named:
        if any(parameter.is_inference() for parameter in model.parameters()):
            raise MergeInputError(
                f"{name} holds inference tensors (its parameters were made under torch.inference_mode()), which "
                f"{method} cannot take the gradients of; load it outside torch.inference_mode(), or pass a copy made "
                "there (copy = type(model)(model.config); copy.load_state_dict(model.state_dict())), or merge with "
                "another method")
