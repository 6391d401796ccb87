"""Parents from Hub references, local folders or objects -> float32 `PreTrainedModel`s plus their processors.

Loading happens in two phases so that incompatible parents are refused cheaply: first every parent is
*located* (Hub revision resolved to a commit sha, config and tokenizer/processor files fetched, weight
format checked), then the parents are compared (configuration, vocabulary), and only then are weights
downloaded and loaded. Weights come from safetensors only unless the caller opts into pickle; remote
code is never run; every model comes back float32 whatever dtype its checkpoint was saved in (the dtype it was
stored in is kept as `LoadedParent.stored_dtype`: the merged model is returned in it, `hf_mudsc.apply.dtype`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hf_mudsc.errors import (
    LoadError,
    MergeInputError,
    ParentMismatchError,
    UnsupportedArchitectureError,
    brief,
    disk_error,
    first_line,
    parent_label,
    shown,
)
from hf_mudsc.load.checks import (
    HEAD_CONFIG_KEYS,
    config_differences,
    config_mismatch,
    config_weights_refusal,
    is_multi_label_head,
    is_one_class_softmax_head,
    is_regression_head,
    not_computed_differences,
    parameter_difference,
    same_class_fix,
    structure_mismatch,
    training_only,
)
from hf_mudsc.load.config_json import FIX as CONFIG_FIX
from hf_mudsc.load.config_json import (
    SIDE_FILE_MAX_BYTES,
    card_too_large,
    check_config_json,
    check_label_numbers,
    read_card,
    refuse_label_keys_not_numbers,
)
from hf_mudsc.load.hub_calls import http_cause, hub_call, hub_error_line
from hf_mudsc.load.links import TEMPLATES_FOLDER, refuse_link_out, refuse_links_out
from hf_mudsc.load.objects import object_source
from hf_mudsc.load.processors import (
    FILE_NAME_MAX_BYTES,
    load_processor,
    processor_from_name,
    refuse_unsavable_chat_templates,
    tokenizer_of,
    unreadable_tokenizer,
)
from hf_mudsc.load.references import (
    LICENSE_NOT_READ,
    card_base_model,
    card_license,
    looks_like_path,
    object_reference,
    parse_reference,
)
from hf_mudsc.load.weight_files import (
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    weights_format,
)

logger = logging.getLogger(__name__)

# Small top-level files fetched before any weights: the config, processors and tokenizers (their chat templates).
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja")






@dataclass
class LoadedParent:
    """A parent model ready to merge, with where it came from (for the model card and the recipe)."""

    model: PreTrainedModel
    processor: Any | None
    reference: str
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    origin: str | None = None
    """How it was found when nobody named it (a base named by the parents' model cards: `BASE_FROM_CARDS`)."""
    parameters: Mapping[str, torch.Tensor] | None = None
    """Loaded lazily (`load_parents_and_base(lazy=True)`): the parameters, read one tensor at a time from the
    safetensors files (`hf_mudsc.load.lazy.LazyParameters`); `model` then lives on the meta device (class, config
    and shapes, no values). None: the parameters are `model`'s."""
    absent: frozenset[str] = frozenset()
    """Parameters of `model` its checkpoint does not hold (a base of another head class read as the parents' class:
    their head, a pooler a masked-LM checkpoint lacks). Their values are fresh initialisations, never to be used: the
    merge treats them as missing from the base."""
    stored_dtype: str | None = None
    """The dtype its floating-point weights are stored in, as torch names it (safetensors headers, a pickle's
    tensors, a model object's own parameters, else its config's `dtype`): `float16`, or `float16/float32` for a
    checkpoint that mixes dtypes; None when unknown. `model` is float32 whatever it is; `out_dtype="auto"` returns
    the merged model in the parents' common one (`hf_mudsc.apply.dtype`)."""
    license: str | None = None
    """The licence its model card declares (`references.card_license`), None: no card, or none declared;
    `references.LICENSE_NOT_READ`: a card that was not read."""
    from_object: bool = False
    """Given to the merge as a model object: `stored_dtype` is the dtype it was loaded as, and `reference` its folder
    or Hub repo only if that holds exactly its weights (`hf_mudsc.load.objects.object_source`)."""
    vocabulary_warning: str | None = None
    """The warning said when it was loaded with other parents whose vocabularies could not be compared with its own
    (one ships no tokenizer): merging these same LoadedParents compares them again (a mismatch is still refused) but
    does not say it twice — the CLI loads the parents, then merges them."""

    @property
    def pinned_reference(self) -> str:
        """`org/name@<commit sha>` for Hub parents (reproducible), the reference otherwise."""
        if self.repo_id and self.commit_sha:
            return f"{self.repo_id}@{self.commit_sha}"
        return self.reference


@dataclass
class _Located:
    """Phase one of loading: everything but the weights."""

    reference: str
    config: PretrainedConfig | None
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    model: PreTrainedModel | None = None
    processor: Any | None = None
    processor_problem: str | None = None
    """Why its folder's tokenizer could not be read (`processors.unreadable_tokenizer`), said only if raw text needs
    it (`before_weights`)."""
    weight_files: list[str] = field(default_factory=list)
    use_pickle: bool = False
    loaded: LoadedParent | None = None
    stored_dtype: str | None = None
    """A pickle checkpoint's stored dtype, read when its weights are checked (`_prepare`)."""
    headers_read: bool = False
    """Its Hub shards' headers were checked over HTTP before their download (`check_hub_shard_headers`)."""
    header_shapes: dict[str, tuple[int, ...]] | None = None
    """Those headers' tensor shapes by stored key, for `check_weights_fit` before the shards are downloaded."""
    weights_fit: bool = False
    """`check_weights_fit` found its config describes its weights (not checked again)."""
    prepared: bool = False
    """Its weights are fetched and their headers checked (`_prepare`): only loading is left."""
    card_bytes: int | None = None
    """The size of README.md in the Hub repository's file list (None: not from the Hub, or no card): an oversized card
    is not downloaded for the base it names (`_card_text`)."""
    read_as: type[PreTrainedModel] | None = None
    """A base of another head class than the parents' (same model type and backbone): the parents' class it is read
    as (`check_base_config`); tensors its checkpoint lacks become `LoadedParent.absent`."""
    options: dict[str, Any] | None = None
    """Constructor arguments its checkpoint's tensors show it was built with (`constructor_options`), once read from
    the safetensors headers (`built_with`)."""






def built_with(located: _Located, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The constructor arguments a located checkpoint was built with beside its config (`constructor_options`), from
    its safetensors keys (`keys` when read elsewhere, else the headers in its folder); none for pickle checkpoints or
    weights not fetched yet (then not remembered: asked again once they are)."""
    if located.options is not None:
        return located.options
    from hf_mudsc.load.lazy import checkpoint_keys, safetensors_files

    if keys is None:
        files = (safetensors_files(located.folder) if located.folder is not None and not located.use_pickle
                 else None)
        if not files or not all(file.is_file() for file in files):
            return {}
        try:
            keys = checkpoint_keys(files)
        except Exception:  # a corrupt file (safetensors' own error class): refused in the loader's line
            check_weight_files(located.reference, located.folder, located.weight_files)
            raise
    cls = located.read_as or model_class_for(located.config, located.reference)
    located.options = constructor_options(cls, keys)
    return located.options


def model_class_for(config: PretrainedConfig, reference: str | None = None) -> type[PreTrainedModel]:
    """The class named in `config.architectures` (the class the checkpoint was saved from); refusals name `reference`
    (default: the config's `_name_or_path`), so that with N parents the message says which."""
    where = f"{reference or getattr(config, '_name_or_path', '') or 'a parent'!r}: "
    names = getattr(config, "architectures", None)
    for name in names if isinstance(names, (list, tuple)) else []:  # a number there is no list of class names
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and (
                cls is PreTrainedModel or cls.__name__.endswith("PreTrainedModel")):
            # an abstract base (no modules of its own): a model of it holds no parameter, every tensor unused
            raise LoadError(f"{where}config.json names the architecture {name}, an abstract base class no checkpoint "
                            f"is saved from; {CONFIG_FIX}")
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            wanted = getattr(cls, "config_class", None)
            if isinstance(wanted, type) and not isinstance(config, wanted):  # its constructor reads other fields
                kind = getattr(wanted, "model_type", "?")
                raise LoadError(
                    f"{where}config.json names the architecture {name}, a class of {kind!r} "
                    f"models, but its model_type is {getattr(config, 'model_type', None)!r}; {CONFIG_FIX}"
                )
            return cls
    raise LoadError(
        f"{where}the config names no transformers architecture ({getattr(config, 'architectures', None)!r}); "
        "models with custom code are not supported (hf_mudsc never sets trust_remote_code). Save the model "
        "with save_pretrained from a transformers class so config.json records it"
    )


# Constructor arguments a config does not record, shown by a tensor only they build: (argument, the parameter's name
# or its tail after a module prefix). ViTModel(use_mask_token=True) holds a trained `embeddings.mask_token` (for
# masked-patch inputs); the ViT adapter places it in the residual group like the CLS token.
BUILT_BY_ARGUMENT = (("use_mask_token", "embeddings.mask_token"),)


def constructor_options(cls: type[PreTrainedModel], names: Iterable[str]) -> dict[str, Any]:
    """The constructor arguments (`BUILT_BY_ARGUMENT`) a model of class `cls` holding parameters (or checkpoint keys)
    `names` was built with: a model built from its config alone lacks those tensors, so `from_pretrained` dropped them
    with an "unused tensors" warning and a model object holding them was refused as carrying an adapter."""
    names = list(names)
    accepted = inspect.signature(cls.__init__).parameters
    return {argument: True for argument, tensor in BUILT_BY_ARGUMENT
            if argument in accepted and any(name == tensor or name.endswith(f".{tensor}") for name in names)}


def agree_on_constructor_options(located: Sequence[_Located]) -> None:
    """Folder (or Hub) parents whose checkpoints were built with different constructor arguments (one ViTModel
    saved with `use_mask_token=True`, one without) are all built with the arguments every one of them shows: the
    tensor only some hold is dropped, with a warning, as before those arguments were read (refusing them asked a
    Hub folder's user to rebuild it). Parents given as objects keep their own (a mismatch is refused later)."""
    if len(located) < 2 or any(p.model is not None or p.loaded is not None for p in located):
        return
    options = [built_with(p) for p in located]
    shared = {key: value for key, value in options[0].items() if all(o.get(key) == value for o in options[1:])}
    dropped = sorted({key for o in options for key in o} - set(shared))
    if not dropped:
        return
    for parent in located:
        parent.options = dict(shared)
    tensors = dict(BUILT_BY_ARGUMENT)
    holders = ", ".join(parent_label(i) for i, o in enumerate(options) if any(o.get(key) for key in dropped))
    logger.warning("%s of parent(s) %s: %s; the other parents' checkpoints hold none, so every parent is built "
                   "without it and the merged model has none",
                   ", ".join(repr(tensors.get(key, key)) for key in dropped), holders,
                   ", ".join(f"{key}=True" for key in dropped))


def meta_model(config: PretrainedConfig, cls: type[PreTrainedModel] | None = None, *,
               reference: str | None = None, options: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """`config`'s model (or `cls`'s) with every tensor on the meta device: shapes, no memory (`options`: constructor
    arguments beside the config, `constructor_options`). A config no model can be built from (zero attention heads, a
    patch of 0 pixels: transformers' constructors divide by them; a size whose tensors have more bytes than torch
    counts, a RuntimeError; a pad_token_id past the vocabulary, torch's AssertionError) is refused in one line naming
    `reference` (default: the config's `_name_or_path`)."""
    cls = cls or model_class_for(config, reference)
    try:
        with torch.device("meta"):
            return cls(config, **(options or {}))
    except (ArithmeticError, ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError,
            AssertionError) as error:
        name = reference or getattr(config, "_name_or_path", "") or cls.__name__
        raise LoadError(f"{name!r}: config.json describes no {cls.__name__} transformers can build "
                        f"({type(error).__name__}: {first_line(error)}); {CONFIG_FIX}") from error


# ----------------------------------------------------------------------------------------------------
# phase 1: locate
# ----------------------------------------------------------------------------------------------------




def own_name_or_path(model: Any) -> str:
    """The folder or Hub id a model object was loaded from (its config's `_name_or_path`), '' for one built in
    memory: the display name a parent falls back to (its class name) names no checkpoint."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _locate(ref: Any, *, token: str | bool | None, allow_pickle: bool,
            cache_dir: str | os.PathLike | None, for_merge: bool = False) -> _Located:
    if isinstance(ref, LoadedParent):
        return _Located(reference=ref.reference, config=ref.model.config, repo_id=ref.repo_id,
                        revision=ref.revision, commit_sha=ref.commit_sha, loaded=ref)
    if isinstance(ref, PreTrainedModel):
        name_or_path = own_name_or_path(ref)
        # as a folder's config.json is: labels numbered other than 0..n-1 name other rows than transformers reads
        refuse_label_keys_not_numbers(getattr(ref.config, "id2label", None), f"{name_or_path or type(ref).__name__!r}")
        check_label_numbers(getattr(ref.config, "id2label", None), f"{name_or_path or type(ref).__name__!r}")
        return _Located(reference=name_or_path or type(ref).__name__, config=ref.config, model=ref,
                        processor=processor_from_name(name_or_path, getattr(ref.config, "_commit_hash", None)))
    if not isinstance(ref, (str, os.PathLike)):
        raise LoadError(_wrapped_model_message(ref) or (
            f"a parent must be a PreTrainedModel, a local folder or a Hub id ('org/name[@revision]'), "
            f"got {type(ref).__name__}"
        ))
    text = os.fspath(ref)
    name, revision = parse_reference(text)
    if revision is None and looks_like_path(name):
        if HUB_ID_SHAPE.fullmatch(text) and os.path.exists(text):  # `org/vit-b` here: a folder, though a Hub id too
            logger.warning("%r is a folder here and also reads as a Hub id: the folder is merged; write './%s' to say "
                           "so, or '%s@main' for the Hub repository", text, text, text)
        return _locate_folder(text, Path(name).expanduser(), allow_pickle, for_merge)
    return _locate_hub(text, name, revision, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir,
                       for_merge=for_merge)


# `org/name`: what a Hub repository id looks like (and a relative folder two levels deep may too).
HUB_ID_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


# Where wrappers a training script holds instead of the model keep it: torch.compile's `OptimizedModule`
# (`_orig_mod`), `DataParallel` / `DistributedDataParallel` (`module`).
WRAPPED_MODEL_ATTRIBUTES = ("_orig_mod", "module")


def _wrapped_model_message(ref: Any) -> str | None:
    """The refusal of a module wrapped around a model (a `torch.compile` wrapper, `DataParallel`, an adapter wrapper
    such as PEFT's `PeftModel`), naming what to pass instead; None for anything else. Not unwrapped silently: the
    caller says which weights are merged (an adapter's are not in the model inside until merged into it)."""
    if not isinstance(ref, torch.nn.Module):
        return None
    kind = type(ref).__name__
    if callable(getattr(ref, "merge_and_unload", None)):
        return (f"a parent is a {kind}, an adapter around a model; merge the adapter into the model's weights and "
                "pass the model that returns (`merged = wrapper.merge_and_unload()`)")
    for attribute in WRAPPED_MODEL_ATTRIBUTES:
        inner = getattr(ref, attribute, None)
        if isinstance(inner, PreTrainedModel):
            return (f"a parent is a {kind} wrapping a {type(inner).__name__}; pass the model inside "
                    f"(`wrapper.{attribute}`), which holds the same weights")
    return None


def check_model_objects(located: Sequence[_Located], who: Sequence[str] | None = None, *,
                        shapes: bool = True) -> None:
    """Refuse, in one line each, parents given as model objects whose weights the merge cannot take as they are: a
    model on the meta device (no values), one carrying parameters its class does not build from its config (an
    adapter or extra module attached, e.g. LoRA's `lora_A`), one whose config gives other shapes than its weights
    (a config edited after the model was built: the merged model, saved with it, would not load its own weights).
    `who`: how messages name each (default: `parent A` ...). Parameters the object lacks are checked by
    `check_objects_complete`, after the parents' names are compared. `shapes=False` (a base: its config is not the
    merged model's, and `pipeline` names each of its tensors that does not fit the parents) skips the last check."""
    for index, parent in enumerate(located):
        model = parent.model
        if model is None:
            continue
        name = who[index] if who is not None else _named(parent, index)
        meta = next((key for key, tensor in model.named_parameters() if tensor.is_meta), None)
        if meta is not None:
            raise LoadError(f"{name} has no weights: its parameters are on the meta device (e.g. {meta!r}); load "
                            "them first (from_pretrained) or pass its folder or Hub id")
        try:
            from_config = meta_model(model.config, type(model), reference=parent.reference,
                                     options=constructor_options(type(model), (k for k, _ in model.named_parameters())))
            built = {key: tuple(tensor.shape) for key, tensor in from_config.named_parameters()}
        except LoadError:  # a class not built from its config alone (a subclass taking more arguments): no comparison
            continue
        extra = [key for key, _ in model.named_parameters() if key not in built]
        if extra:
            raise LoadError(
                f"{name} holds {len(extra)} parameter{'s' if len(extra) > 1 else ''} a {type(model).__name__} built "
                f"from its config has not (e.g. {extra[0]!r}): an adapter or extra module is attached; merge it into "
                "the model's weights (PEFT: merge_and_unload()) or remove it, then pass the model")
        tied = min(tied_parameters(model) - tied_parameters(from_config), default=None)
        if tied is not None:  # its names lack one of the pair: refused later as built otherwise, which it is not
            raise LoadError(f"{name}'s {tied[0]!r} is the same tensor as {tied[1]!r} (tied after building); untie it "
                            "(give it its own copy: module.weight = torch.nn.Parameter(module.weight.detach().clone()))"
                            " and pass the model")
        # A buffer saved with the weights (`register_buffer`, persistent) that the class does not build: parent A's
        # would be copied into the merged model and its model.safetensors (`from_pretrained`: UNEXPECTED), another
        # parent's dropped.
        built_buffers = {key for key, _ in from_config.named_buffers()}
        extra = [key for key in saved_buffers(model) if key not in built_buffers]
        if extra:
            raise LoadError(
                f"{name} holds {len(extra)} buffer{'s' if len(extra) > 1 else ''} a {type(model).__name__} built "
                f"from its config has not (e.g. {extra[0]!r}): an extra module or buffer is attached "
                "(register_buffer); remove it, then pass the model")
        if not shapes:
            continue
        fix = ("give the model back the config it was built with (a config edited after the model was built changes "
               "no layer)")
        for key, tensor in model.named_parameters():
            if tuple(tensor.shape) != built[key]:
                raise LoadError(f"{name}'s config does not describe its weights: {key!r} is {tuple(tensor.shape)} but "
                                f"its config builds {built[key]}; {fix}")
        differing = _built_settings_differ(model, from_config)
        if differing is not None:
            module, attribute, held, configured = differing
            raise LoadError(f"{name}'s config does not describe the model: {module}.{attribute} is {held!r} but its "
                            f"config builds {configured!r}; {fix}")


def tied_parameters(model: torch.nn.Module) -> set[tuple[str, str]]:
    """`(name, first name)` for each parameter name of `model` that holds the same Parameter as an earlier name (a
    tie: `named_parameters()` lists it once, under the first name)."""
    first: dict[int, str] = {}
    tied = set()
    for key, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied.add((key, first[id(parameter)]))
        else:
            first[id(parameter)] = key
    return tied


def saved_buffers(model: torch.nn.Module) -> list[str]:
    """The names of `model`'s buffers `save_pretrained` writes (persistent ones: in its state dict), in its order."""
    parameters = {key for key, _ in model.named_parameters(remove_duplicate=False)}
    return [key for key in model.state_dict(keep_vars=True) if key not in parameters]


def check_objects_complete(located: Sequence[_Located]) -> None:
    """Refuse, in one line, a parent object lacking parameters its config builds (layers removed after building while
    `num_hidden_layers` still counts them): the merge would end in an error naming the adapter's spec. Only a bare
    encoder's pooler may be left out (`add_pooling_layer=False`, a constructor choice). Run after the parents' names
    are compared, which names a module one parent lacks and the other holds."""
    for index, parent in enumerate(located):
        model = parent.model
        if model is None:
            continue
        try:
            from_config = meta_model(model.config, type(model), reference=parent.reference,
                                     options=constructor_options(type(model), (k for k, _ in model.named_parameters())))
        except LoadError:  # a class not built from its config alone: no comparison
            continue
        held = {key for key, _ in model.named_parameters()}
        lacking = sorted(key for key, _ in from_config.named_parameters() if key not in held)
        if lacking and not saved_without_pooler(type(model), lacking, (), ()):
            raise LoadError(
                f"{_named(parent, index)}'s config does not describe the model: it lacks {len(lacking)} parameter"
                f"{'s' if len(lacking) > 1 else ''} its config builds (e.g. {lacking[0]!r}), as when layers were "
                "removed after building; give it a config that describes it (e.g. num_hidden_layers = the layers it "
                "holds) or pass the folder it was saved to")


def _built_settings_differ(model: torch.nn.Module, built: torch.nn.Module) -> tuple[str, str, Any, Any] | None:
    """The first module setting (a number, text or tuple the layer keeps, e.g. `num_attention_heads`, `eps`) that
    differs between `model` and `built`, the same class built from `model`'s config, as (module, attribute, model's,
    config's); None when they agree. Models inside are left out (their names and paths are no layer's settings), and
    dropout: a merge runs every parent in eval mode."""
    modules = dict(built.named_modules())
    for module_name, module in model.named_modules():
        twin = modules.get(module_name)
        if twin is None or any(isinstance(m, (PreTrainedModel, torch.nn.Dropout)) for m in (module, twin)):
            continue
        if type(twin) is not type(module):
            if next(module.parameters(recurse=False), None) is not None \
                    or next(twin.parameters(recurse=False), None) is not None:
                continue  # a layer with weights swapped for another: the parameter names differ (refused by name)
            # a layer without weights built from an edited setting, e.g. the activation of an edited `hidden_act`
            parent_name, _, attribute = module_name.rpartition(".")
            return parent_name or type(model).__name__, attribute, type(module).__name__, type(twin).__name__
        for attribute, held in vars(module).items():
            if attribute.startswith("_") or training_only(attribute):
                continue
            from_config = vars(twin).get(attribute)
            if _is_function(held) and _is_function(from_config):  # GELUActivation's `act`: gelu or gelu_python
                if _function_of(held) is not _function_of(from_config):
                    return module_name, attribute, _function_name(held), _function_name(from_config)
                continue
            if not _is_setting(held):
                continue
            if _is_setting(from_config) and held != from_config and held == held:  # NaN == NaN never holds
                return module_name, attribute, held, from_config
    return None


def _is_function(value: Any) -> bool:
    return isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType))


def _function_of(value: Any) -> Any:
    """The function itself: a bound method of each built layer is a new object (`self._gelu_python`)."""
    return getattr(value, "__func__", value)


def _function_name(value: Any) -> str:
    return getattr(_function_of(value), "__qualname__", repr(value))


def _is_setting(value: Any) -> bool:
    """A plain value a layer keeps from its config (no flag: `training` and the like change after building)."""
    if isinstance(value, tuple):
        return all(_is_setting(item) for item in value)
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _locate_folder(reference: str, path: Path, allow_pickle: bool, for_merge: bool = False) -> _Located:
    if not path.is_dir():
        raise LoadError(
            f"no model folder at {str(path)!r}; pass an existing folder written by save_pretrained, or a Hub "
            "id such as 'org/name' or 'org/name@revision'"
        )
    try:  # safetensors (and the card, the recipe) take UTF-8 paths only
        os.fspath(path.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise LoadError(f"{reference!r}: the folder's path holds bytes that are not UTF-8 text, which safetensors "
                        "cannot open; rename the folder (or the folders above it) in UTF-8 characters") from None
    refuse_links_out(reference, path)
    _require_config_json(path)
    files = [p.name for p in path.iterdir() if p.is_file()]
    refuse_large_side_files(reference, _folder_sizes(path, files), _FOLDER_FIX)
    weight_files, use_pickle = weights_format(reference, files, allow_pickle)
    config = load_config(path, reference, for_merge=for_merge)
    check_weight_files(reference, path, weight_files)
    located = _Located(reference=reference, config=config, folder=path, weight_files=weight_files,
                       use_pickle=use_pickle)
    if not use_pickle:  # the headers are here already: a config or weights they refuse fail before any comparison
        check_config_fits_weights(located)
    return located


def refuse_large_side_files(reference: str, sizes: Mapping[str, int], fix: str) -> None:
    """Refuse a config, processor or tokenizer file over `SIDE_FILE_MAX_BYTES` before any is read (each is read
    whole): `sizes` maps the top-level file names to their sizes — a folder's (an unpacked archive, a cached snapshot
    read offline) from disk, a Hub repository's from its file list; `fix` ends the message (where to remove it)."""
    for name in sorted(sizes):
        if name.endswith(SMALL_FILE_SUFFIXES) and sizes[name] > SIDE_FILE_MAX_BYTES:
            raise LoadError(f"{reference!r}: {name} is {sizes[name]:,} bytes, more than the {SIDE_FILE_MAX_BYTES:,} a "
                            f"file read with the config may be (.json/.txt/.model/.jinja at the top level or in "
                            f"{TEMPLATES_FOLDER}/); {fix}")


def _folder_sizes(folder: Path, names: Sequence[str]) -> dict[str, int]:
    """The sizes of the side files among `names` in `folder`, and of those in its `TEMPLATES_FOLDER`
    (`refuse_large_side_files`)."""
    templates = folder / TEMPLATES_FOLDER
    names = list(names) + ([f"{TEMPLATES_FOLDER}/{entry.name}" for entry in templates.iterdir() if entry.is_file()]
                           if templates.is_dir() and not templates.is_symlink() else [])
    return {name: (folder / name).stat().st_size for name in names if name.endswith(SMALL_FILE_SUFFIXES)}


_FOLDER_FIX = "a model's side files are small — remove it from the folder, or restore the one save_pretrained wrote"


HUB_FILE_FIX = "choose another revision or ask the repo's owner"
"""The fix of a Hub repository's broken or missing file, read from the Hub: nothing was cached to delete or fetch
again, and the repository is not the user's to re-save (public: the dry run's header reads refuse alike)."""


def _shard_names(reference: str, folder: Path, index_name: str, *, hub: bool = False) -> list[str]:
    """The shard files a `*.index.json` of `folder` points to; a safetensors index naming a file that is not
    `.safetensors` is refused here, where the index is read (for a Hub repo when it is located, before any weight is
    requested: its shards would be downloaded and only then refused). `hub`: the index came from a Hub repository."""
    fix = HUB_FILE_FIX if hub else "re-download it or re-save the model with save_pretrained"
    try:
        index = json.loads((folder / index_name).read_text())
        names = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise LoadError(f"{reference!r}: {index_name} is unreadable ({type(error).__name__}: {error}); "
                        f"{fix}") from error
    for name in names:  # read as the parent's weights: never a file of this machine outside the folder
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise LoadError(f"{reference!r}: {index_name} names the shard {shown(name)}, outside the folder; {fix}")
        if "\x00" in name or any(len(os.fsencode(part)) > FILE_NAME_MAX_BYTES for part in Path(name).parts):
            raise LoadError(f"{reference!r}: {index_name} names the shard {shown(name)}, which is no file name (a NUL "
                            f"byte, or a name over {FILE_NAME_MAX_BYTES} bytes); {fix}")
    if not names:
        raise LoadError(f"{reference!r}: {index_name} names no shard (its weight_map is empty); {fix}")
    if not isinstance(index.get("metadata"), dict):  # transformers reads it as a dict (a KeyError without one)
        raise LoadError(f"{reference!r}: {index_name} has no 'metadata' object (save_pretrained writes one); {fix}")
    odd = next((name for name in names if not name.endswith(".safetensors")), None)
    if index_name == SAFETENSORS_INDEX and odd is not None:  # a folder, `.`, config.json: opened as safetensors
        where = "repository" if hub else "folder"
        raise LoadError(f"{reference!r}: {index_name} names the shard {odd!r}, not a .safetensors file of the "
                        f"{where}; {fix}")
    return names


def check_weight_files(reference: str, folder: Path, weight_files: Sequence[str]) -> None:
    """Read the header of every safetensors file (cheap: no tensor data) so that a truncated or corrupt file
    is reported in one line before any weights are loaded; pickle files are checked when they are loaded."""
    from safetensors import SafetensorError, safe_open

    names: list[str] = []
    for name in weight_files:
        if name.endswith(".index.json"):
            shards = _shard_names(reference, folder, name)
            names += [shard for shard in shards if shard.endswith(".safetensors")]
            for shard in shards:  # pickle shards too: their headers are read only when they load
                if (folder / shard).is_symlink():
                    refuse_link_out(reference, folder, folder / shard)
        elif name.endswith(".safetensors"):
            names.append(name)
    stored_in: dict[str, str] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise LoadError(missing_file_line(reference, name))
        refuse_link_out(reference, folder, path)
        try:
            with safe_open(str(path), framework="pt") as opened:
                keys = list(opened.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise LoadError(corrupt_file_line(reference, name, first_line(error))) from error
        refuse_stored_twice(reference, stored_in, keys, name)
    if SAFETENSORS_INDEX in weight_files:
        refuse_lost_tensor(reference, folder, stored_in)


def refuse_lost_tensor(reference: str, folder: Path, stored_in: Mapping[str, str], *, hub: bool = False) -> None:
    """Refuse a shard index placing a tensor that no shard holds (`stored_in`: key -> the shard whose header holds
    it), which from_pretrained would find missing only once every parent was checked. The index was read by
    `_shard_names` before: a JSON object with a weight_map of strings. `hub`: the headers were read from the Hub."""
    weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
    lost = next((key for key in weight_map if key not in stored_in), None)
    if lost is not None:
        raise LoadError(f"{reference!r}: {SAFETENSORS_INDEX} puts tensor {shown(lost)} in {weight_map[lost]}, but "
                        "no shard holds it (a shard is truncated or from another save); "
                        + (HUB_FILE_FIX if hub else "re-download the model or re-save it with save_pretrained"))


def corrupt_file_line(reference: str, name: str, reason: str, *, hub: bool = False) -> str:
    """The refusal of a safetensors file whose header cannot be read (public: the dry run reads Hub headers). `hub`:
    the header was read from the Hub, so nothing was cached: the fix is another revision or the repo's owner."""
    if hub:
        return (f"{reference!r}: {name} is not a valid safetensors file ({reason}): it is truncated or corrupt; "
                f"{HUB_FILE_FIX}")
    return (f"{reference!r}: {name} is not a valid safetensors file ({reason}): it is truncated or corrupt. Download "
            "it again (for a Hub model, delete it from the cache first) or re-save it with save_pretrained")


def missing_file_line(reference: str, name: str, *, hub: bool = False) -> str:
    """The refusal of a weight file the shard index names but the folder (or, `hub`, the Hub repository) lacks
    (public: the dry run reads Hub headers)."""
    if hub:
        return f"{reference!r}: weight file {name} is missing from the repository; {HUB_FILE_FIX}"
    return f"{reference!r}: weight file {name} is missing; re-download the model or re-save it with save_pretrained"


def refuse_stored_twice(reference: str, stored_in: dict[str, str], keys: Iterable[str], name: str, *,
                        hub: bool = False) -> None:
    """Refuse a tensor of file `name` already stored in another (`stored_in`: key -> file, updated with `keys`):
    which copy transformers would load is its own affair. Public: the dry run checks Hub headers alike (`hub`: read
    from the Hub, where the fix is another revision or the repo's owner)."""
    keys = list(keys)
    twice = next((key for key in keys if key in stored_in), None)
    if twice is not None:
        raise LoadError(f"{reference!r}: tensor {twice!r} is stored twice, in {stored_in[twice]} and {name}; "
                        + (HUB_FILE_FIX if hub else "re-download it or re-save the model with save_pretrained"))
    stored_in.update(dict.fromkeys(keys, name))


def _require_config_json(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise LoadError(f"{str(folder)!r} has no config.json; save the model with save_pretrained")


def folder_config(folder: Path, reference: str) -> PretrainedConfig:
    """A local model folder's config alone, read only after the checks the loader makes first (no link out of the
    folder, a config.json of a config's size, the counts and code choices `load_config` refuses): what reads a
    folder's config ahead of its weights (`evaluate` checking its flags) refuses what loading it would, in the same
    words, instead of handing transformers a file the load never reads (a billion labels: tens of GB)."""
    refuse_links_out(reference, folder)
    _require_config_json(folder)
    refuse_large_side_files(reference, {"config.json": (folder / "config.json").stat().st_size}, _FOLDER_FIX)
    return load_config(folder, reference)


def load_config(folder: Path, reference: str, *, for_merge: bool = False) -> PretrainedConfig:
    """A model folder's config, refused in one line (`LoadError`) as the loader refuses it: hostile counts and remote
    code before transformers reads it, anything transformers cannot read. `for_merge`: a model_type no adapter merges
    is refused first (`UnsupportedArchitectureError`), before transformers acts on the file (evaluate reads any)."""
    from huggingface_hub.errors import StrictDataclassError

    data = check_config_json(folder, reference)  # not a JSON object, absurd counts: refused before transformers reads
    if for_merge:
        from hf_mudsc.architectures import check_config_supported

        check_config_supported(data)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError, IndexError, ArithmeticError,
            StrictDataclassError) as error:  # IndexError: a dtype that is a number; a sub-config with 0 heads divides
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        # a model type transformers knows: a value of the wrong kind, whose fix is the config saved with the weights
        fix = (f"; {CONFIG_FIX}" if data["model_type"] in CONFIG_MAPPING
               else ". Models that need custom code (trust_remote_code) are not supported")
        raise LoadError(f"cannot read the config of {reference!r}: {brief(error, 400)}{fix}") from error


def _locate_hub(reference: str, repo_id: str, revision: str | None, *, token: str | bool | None,
                allow_pickle: bool, cache_dir: str | os.PathLike | None, for_merge: bool = False) -> _Located:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise LoadError(
            f"{reference!r} is neither an existing folder nor a valid Hub id ({error}); pass 'org/name', "
            "'org/name@revision' or a path to a folder written by save_pretrained"
        ) from error
    if constants.HF_HUB_OFFLINE:
        folder = hub_request(reference, lambda: snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True),
            what="looking it up in the local cache")
        folder = Path(folder)
        refuse_links_out(reference, folder)  # before its config is read: links may lead only into the cache's blobs
        files = [p.name for p in folder.iterdir() if p.is_file()]
        refuse_large_side_files(reference, _folder_sizes(folder, files), _FOLDER_FIX)
        weight_files, use_pickle = weights_format(reference, files, allow_pickle)
        sha = folder.name  # a snapshot folder is named by its commit sha
        card_bytes = None  # a cached card is measured when it is read
        logger.info("offline: using the cached snapshot %s of %s", sha, repo_id)
        config = load_config(folder, reference, for_merge=for_merge)
    else:
        info = hub_request(
            reference, lambda: HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True,
                                                  timeout=constants.HF_HUB_ETAG_TIMEOUT),
            what="fetching the repository information (file list and commit)", timeout_setting="HF_HUB_ETAG_TIMEOUT")
        sha = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
        top_level = [f for f in files if "/" not in f]
        weight_files, use_pickle = weights_format(reference, top_level, allow_pickle)
        small = [f for f in top_level if f.endswith(SMALL_FILE_SUFFIXES)]
        if "config.json" not in small:
            raise LoadError(f"{reference!r} has no config.json at revision {sha}; it is not a transformers model")
        sizes = {s.rfilename: s.size for s in (info.siblings or []) if s.size is not None}
        card_bytes = sizes.get("README.md")
        refuse_large_side_files(reference, {name: sizes.get(name, 0) for name in small},
                                "a model repository's side files are small — remove it from the repository or "
                                "choose another revision")
        # config.json alone first: a config refused (not JSON, absurd counts, a model_type no adapter merges) is
        # refused before the tokenizer and processor files, which may be tens of MB, are fetched
        folder = download_files(reference, repo_id, sha, ["config.json"], token=token, cache_dir=cache_dir)
        refuse_links_out(reference, folder)  # a cached snapshot is handed back unchecked: links only into its blobs
        config = load_config(folder, reference, for_merge=for_merge)
        if for_merge:  # the class it names, refused here as a folder's is when located (before any download)
            model_class_for(config, reference)
        rest = [name for name in small if name != "config.json"]
        if rest:
            download_files(reference, repo_id, sha, rest, token=token, cache_dir=cache_dir)
            refuse_links_out(reference, folder)
        remember_revision(folder, revision, sha)
    for name in weight_files:  # a shard index is read before its shards (their names, headers, sizes): checked here
        if name.endswith(".index.json"):
            _shard_names(reference, folder, name, hub=True)
    return _Located(reference=reference, config=config, folder=folder, repo_id=repo_id, revision=revision,
                    commit_sha=sha, weight_files=weight_files, use_pickle=use_pickle, card_bytes=card_bytes)


def remember_revision(snapshot: Path, revision: str | None, sha: str) -> None:
    """Record in the cache which commit `revision` (None: `main`, what huggingface_hub reads offline) resolved to:
    the files are downloaded by commit sha, so huggingface_hub writes no `refs/<revision>` and an offline re-run of
    the same reference would not find them. huggingface_hub's own helper for this is private
    (`file_download._cache_commit_hash_for_specific_revision`), so the file is written here as the documented cache
    layout has it: `<repo folder>/refs/<revision>` holding the sha. A cache we cannot write to is left as it is."""
    revision = revision or "main"
    if revision == sha or snapshot.parent.name != "snapshots":  # a sha needs no ref; not a cache's snapshot
        return
    ref = snapshot.parent.parent / "refs" / revision  # <repo folder>/snapshots/<sha> -> <repo folder>/refs/...
    try:
        if ref.is_file() and ref.read_text() == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        partial.write_text(sha)
        partial.replace(ref)  # atomic: a concurrent reader sees the old sha or the new one
    except OSError as error:
        logger.debug("could not record %s -> %s in the cache: %s", revision, sha, error)


def download_files(reference: str, repo_id: str, commit_sha: str, filenames: Sequence[str], *,
                   token: str | bool | None, cache_dir: str | os.PathLike | None) -> Path:
    """Top-level files of a Hub model at one commit -> its snapshot folder in the cache.

    One `hf_hub_download` per file rather than `snapshot_download`, whose tree listing has no timeout (a
    stalled server would hang it forever): every request here is bounded by HF_HUB_ETAG_TIMEOUT /
    HF_HUB_DOWNLOAD_TIMEOUT, and every failure names the file it was waiting for.
    """
    from huggingface_hub import constants, hf_hub_download

    folder = None
    for filename in filenames:
        path = hub_request(reference, lambda name=filename: hf_hub_download(
            repo_id, name, revision=commit_sha, cache_dir=cache_dir, token=token,
            etag_timeout=constants.HF_HUB_ETAG_TIMEOUT), what=f"downloading {filename}")
        folder = Path(path).parent
    if folder is None:
        raise LoadError(f"{reference!r}: nothing to download at commit {commit_sha}")
    return folder


def hub_request(reference: str, call, *, what: str = "contacting the Hub",
              timeout_setting: str = "HF_HUB_DOWNLOAD_TIMEOUT"):
    """Run a Hub client call, turning its errors into a one-line LoadError (public: the dry run's header reads use
    it, so that they fail in the loader's words) that says what was being waited
    for (`what`) and what to do (timeouts and dropped connections: `hub_calls.hub_call`)."""
    from huggingface_hub import constants, errors

    try:
        return hub_call(call, what=what, seconds=getattr(constants, timeout_setting, None), setting=timeout_setting,
                        error=LoadError, subject=f"{reference!r}: ",
                        then="retry the command (files downloaded completely stay in the cache and are not "
                             "fetched again)")
    except errors.RevisionNotFoundError as error:
        raise LoadError(f"{reference!r}: the revision does not exist in the repository ({first_line(error)}); "
                        "use an existing branch, tag or commit sha") from error
    except errors.GatedRepoError as error:
        raise LoadError(f"{reference!r} is gated: accept its terms on the Hub and pass a token") from error
    except errors.RepositoryNotFoundError as error:
        raise LoadError(f"no model repository {reference!r} on the Hub (or it is private: pass token= or "
                        "log in with `hf auth login`)") from error
    except errors.LocalEntryNotFoundError as error:
        answer = http_cause(error)  # online, huggingface_hub raises this from the Hub's own refusal (403, 500)
        if answer is not None and not constants.HF_HUB_OFFLINE:
            raise LoadError(f"the Hub refused {reference!r} while {what}: {hub_error_line(answer)}") from error
        raise LoadError(f"{reference!r} is not in the local cache and the Hub is unreachable or offline "
                        "(HF_HUB_OFFLINE=1); download it once online or pass a local folder") from error
    except errors.HfHubHTTPError as error:
        raise LoadError(f"the Hub refused {reference!r} while {what}: {hub_error_line(error)}") from error
    except (OSError, ConnectionError) as error:
        if disk_error(error) is not None:  # the local disk (the cache) failed, not the network: said as a disk failure
            raise
        raise LoadError(f"{reference!r}: cannot reach the Hub while {what} ({first_line(error)}); check the "
                        "connection and retry the command") from error


def _is_text_model(config: PretrainedConfig | None) -> bool:
    if config is None:
        return False
    if getattr(config, "vocab_size", None) is not None:
        return True
    text_config = getattr(config, "text_config", None)
    return text_config is not None and getattr(text_config, "vocab_size", None) is not None


def _vocabulary(located: _Located) -> dict[str, int] | None:
    processor = located.processor
    if located.loaded is not None:
        processor = located.loaded.processor
    tokenizer = tokenizer_of(processor)
    return dict(tokenizer.get_vocab()) if tokenizer is not None else None


def check_vocabularies(located: Sequence[_Located]) -> str | None:
    """Refuse text parents whose token ids mean different tokens (their embedding rows cannot match). Returns the
    warning said when some parents ship no tokenizer (not said again for LoadedParents that were loaded together and
    warned about alike: `LoadedParent.vocabulary_warning`)."""
    if len(located) < 2 or not all(_is_text_model(p.config) for p in located):
        return None
    vocabularies = [_vocabulary(p) for p in located]
    if all(v is None for v in vocabularies):
        logger.debug("no parent ships a tokenizer; vocabularies not compared")
        return None
    if any(v is None for v in vocabularies):
        missing = [p.reference for p, v in zip(located, vocabularies) if v is None]
        warning = (f"cannot compare vocabularies: {', '.join(missing)} ship(s) no tokenizer; make sure all parents "
                   "were fine-tuned with the same tokenizer")
        if not all(p.loaded is not None and p.loaded.vocabulary_warning == warning for p in located):
            logger.warning("%s", warning)
        return warning
    first = vocabularies[0]
    for parent, vocab in zip(located[1:], vocabularies[1:]):
        if vocab == first:
            continue
        differing = sorted(t for t in set(first) | set(vocab) if first.get(t) != vocab.get(t))
        examples = ", ".join(f"{t!r}: {first.get(t)} vs {vocab.get(t)}" for t in differing[:3])
        raise ParentMismatchError(
            f"{located[0].reference!r} and {parent.reference!r} use different tokenizer vocabularies "
            f"({len(first)} vs {len(vocab)} tokens, {len(differing)} differ, e.g. {examples}): the same token "
            "id means different text in the two models, so their embeddings cannot be merged. Merge models "
            "fine-tuned from the same base checkpoint and tokenizer"
        )
    return None


def _architecture(located: _Located) -> str:
    """The class that will be instantiated (the object's own class for objects)."""
    model = located.model if located.model is not None else (located.loaded.model if located.loaded else None)
    if model is not None:
        return type(model).__name__
    names = getattr(located.config, "architectures", None)
    return names[0] if isinstance(names, (list, tuple)) and names and isinstance(names[0], str) else (
        f"a {located.config.model_type!r} model")


def _named(located: _Located, index: int) -> str:
    """How messages name parent `index`: its letter, plus its reference when it has one beyond its class name."""
    label = f"parent {parent_label(index)}"
    return label if located.reference == _architecture(located) else f"{label} ({located.reference!r})"


def check_configs(located: Sequence[_Located]) -> None:
    """Refuse parents whose configurations differ (architecture, sizes) before any weights are fetched; say in one
    INFO line the differences the merge lets pass (`checks.not_computed_differences`: parent A's values are kept)."""
    first = located[0]
    skipped: list[str] = []
    for index, parent in enumerate(located):
        if (parent.config is not None and _architecture(parent).endswith("Classification")
                and is_one_class_softmax_head(parent.config)):
            raise ParentMismatchError(
                f"{_named(parent, index)}'s config says problem_type 'single_label_classification' with one label "
                "(num_labels=1): a softmax over one class is 1 on every input (beside other tasks it would win every "
                "joint decision), and transformers refuses to load such a config; set problem_type 'regression' for "
                "a score (config.problem_type = 'regression'), or give the head one row per class (2 or more)")
    for index, other in enumerate(located[1:], start=1):
        if first.config is None or other.config is None:
            continue
        kind_a, kind_b = _architecture(first), _architecture(other)
        if kind_a != kind_b:
            raise ParentMismatchError(
                f"parents have different architectures: {_named(first, 0)} is {kind_a}, {_named(other, index)} is "
                f"{kind_b}; {same_class_fix(kind_a)}"
            )
        differences = config_differences(first.config, other.config)
        if differences:
            raise ParentMismatchError(config_mismatch(f"{_named(first, 0)} and {_named(other, index)}", differences))
        not_computed = not_computed_differences(first.config, other.config)
        if not_computed:
            skipped.append(f"parent {parent_label(index)}: {', '.join(not_computed)}")
        if kind_a.endswith("Classification") and is_regression_head(first.config) != is_regression_head(other.config):
            (regression, r), (classifier, c) = sorted(((first, 0), (other, index)),
                                                      key=lambda pair: not is_regression_head(pair[0].config))
            outputs = getattr(regression.config, "num_labels", 1)
            # A one-output head is regression by transformers' rule; one of several says so by its problem_type.
            what, why = (("one output", "each task's softmax over one output is 1") if outputs == 1 else
                         (f"problem_type 'regression', {outputs} outputs", "its scores would be read as class logits"))
            raise ParentMismatchError(
                f"{_named(regression, r)} has a regression head ({what}) and {_named(classifier, c)} a classifier: "
                f"one concatenated head cannot mix scores with class logits ({why}); merge classifiers with "
                "classifiers and regression heads with regression heads, or merge their encoders (e.g. ViTModel)"
            )
        if kind_a.endswith("Classification") and is_multi_label_head(first.config) != is_multi_label_head(
                other.config):
            (multi, m), (single, s) = sorted(((first, 0), (other, index)),
                                             key=lambda pair: not is_multi_label_head(pair[0].config))
            raise ParentMismatchError(
                f"{_named(multi, m)} has a multi-label head (problem_type 'multi_label_classification': a sigmoid "
                f"per label) and {_named(single, s)} a single-label one (a softmax): the merged model has one "
                "problem_type, and either task would be read by the other's rule; merge multi-label heads with "
                "multi-label heads, or merge their encoders (e.g. ViTModel)"
            )
    if skipped:
        logger.info("the parents' configs differ in fields no eval-mode forward reads (merged as they are; the merged "
                    "config keeps parent A's values): %s", "; ".join(skipped))


def held_parameters(located: _Located, keys: Sequence[str] | None = None) -> list[str] | None:
    """The parameter names a located parent has once loaded, in its model's order, from what is known before its
    weights are read: a model object's or `LoadedParent`'s own, else its safetensors headers (named as
    `from_pretrained` names them: `lazy.stored_keys`) — a bare encoder saved without its pooler is read without one
    (`_load_weights`). `keys`: the stored keys when already read elsewhere (a dry run reads a Hub checkpoint's
    headers over HTTP). None when not known yet or left to the loader: a Hub checkpoint not downloaded, pickle
    weights, a checkpoint lacking more than a pooler (`_load_weights` refuses it, naming the tensors)."""
    from hf_mudsc.load.lazy import checkpoint_keys, safetensors_files, stored_keys

    if located.loaded is not None:
        return [name for name in parameters_of(located.loaded) if name not in located.loaded.absent]
    if located.model is not None:
        return [name for name, _ in located.model.named_parameters()]
    if located.folder is None or located.config is None or located.use_pickle or located.read_as is not None:
        return None
    if keys is None:
        files = safetensors_files(located.folder)
        if not files or not all(file.is_file() for file in files):
            return None
        keys = checkpoint_keys(files)
    model = meta_model(located.config, reference=located.reference, options=built_with(located, keys))
    named = stored_keys(model, keys)
    if named is None:
        return None
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in named]
    if missing and not saved_without_pooler(type(model), missing, (), ()):
        return None
    return [name for name in names if name in named]


def check_parameter_names(located: Sequence[_Located], keys: Sequence[Sequence[str] | None] | None = None) -> bool:
    """Refuse parents of one class and configuration whose parameters differ (constructor choices a config does not
    record: a bare encoder with its pooler and one built with `add_pooling_layer=False`), in one line naming the first
    module that differs, before any weights are loaded: the merge failed on a tensor only parent A holds, or dropped
    one only another parent holds. Returns whether every parent's names were known (`held_parameters`); the loaders
    check again once the weights are fetched, before reading them (a Hub parent's headers come with its weights).
    `keys`: each parent's stored tensor keys when read elsewhere (None entries: read here)."""
    names = [held_parameters(parent, None if keys is None else keys[index]) for index, parent in enumerate(located)]
    first = names[0]
    for index, (other, held) in enumerate(zip(located[1:], names[1:]), start=1):
        if first is None or held is None:
            continue
        difference = parameter_difference(first, held)
        if difference is not None:
            raise ParentMismatchError(structure_mismatch(_named(located[0], 0), _named(other, index), *difference,
                                                         _architecture(located[0])))
    return all(held is not None for held in names)


# ----------------------------------------------------------------------------------------------------
# phase 2: weights
# ----------------------------------------------------------------------------------------------------


def _as_float32(model: PreTrainedModel) -> PreTrainedModel:
    """The object itself when already float32 (never modified); otherwise a float32 copy."""
    floating = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == torch.float32 for t in floating):
        return model
    logger.info("converting %s to float32 (a copy; the object passed in is left as it is)", type(model).__name__)
    return copy.deepcopy(model).to(torch.float32)


def _fetch_weights(located: _Located, *, token: str | bool | None, cache_dir: str | os.PathLike | None) -> None:
    """Download the weight files of a Hub parent into its snapshot folder (no-op for folders/offline)."""
    from huggingface_hub import constants

    if located.repo_id is None or constants.HF_HUB_OFFLINE:
        return
    names = list(located.weight_files)
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if index_name in names:
            names += _shard_names(located.reference, located.folder, index_name)
    download_files(located.reference, located.repo_id, located.commit_sha, names, token=token, cache_dir=cache_dir)


HEADER_READERS = 8
"""How many shard headers of a Hub repo are read at once (`read_hub_headers`, as huggingface_hub's
`get_safetensors_metadata` reads them): each is a small ranged GET, so the time is the Hub's latency, not the
bandwidth."""


def hub_header_refusal(reference: str, name: str, error: BaseException) -> LoadError | None:
    """The loader's line for a failed read of Hub file `name`'s safetensors header (public: the dry run reads the
    headers alike), or None when it is no fault of the file (the Hub's other answers: `hub_request`'s line stands):
    a file the repo lacks (404), an empty one (the ranged GET is answered 416: no byte to give), a header that does
    not parse."""
    from huggingface_hub import errors

    cause = error.__cause__ if isinstance(error, LoadError) else error
    if isinstance(cause, errors.EntryNotFoundError):
        return LoadError(missing_file_line(reference, name, hub=True))
    response = getattr(cause, "response", None)
    if isinstance(cause, errors.HfHubHTTPError) and getattr(response, "status_code", None) == 416:
        return LoadError(corrupt_file_line(reference, name, "empty file", hub=True))
    if isinstance(error, errors.SafetensorsParsingError):
        reason = str(error).split("): ", 1)[-1].split(". ")[0]
        return LoadError(corrupt_file_line(reference, name, reason, hub=True))
    return None


def hub_weight_names(located: _Located) -> list[str]:
    """The safetensors files of a located Hub checkpoint, in order: its shards (from the index fetched when it was
    located) or its single model.safetensors; none for pickle weights."""
    if located.use_pickle or located.folder is None:
        return []
    if SAFETENSORS_INDEX in located.weight_files:
        return _shard_names(located.reference, located.folder, SAFETENSORS_INDEX, hub=True)  # all .safetensors
    return [name for name in located.weight_files if name.endswith(".safetensors")]


def _proper_tensor_info(info: Any) -> bool:
    """Whether a tensor entry of a Hub safetensors header is what the safetensors format says (huggingface_hub's
    parser does not check: a header of valid JSON but not of the format crashed whatever read it): a str dtype, a
    shape of ints >= 0, data offsets of two ints 0 <= begin <= end."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    shape, offsets = info.shape, info.data_offsets
    return (isinstance(info.dtype, str) and isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape)
            and isinstance(offsets, tuple) and len(offsets) == 2 and all(is_int(n) for n in offsets)
            and 0 <= offsets[0] <= offsets[1])


def read_hub_headers(located: _Located, *, token: str | bool | None) -> dict[str, Any]:
    """The safetensors headers of a located Hub checkpoint, read over HTTP before any weight is downloaded: file name ->
    huggingface_hub's `SafetensorsFileMetadata`, in the files' order. The one reader of Hub headers: the loader
    (`check_hub_shard_headers`) and the dry run (`plan.header_facts`) both call it, so they refuse alike in the same
    words and ask the Hub the same requests — a ranged GET of each file's first bytes (a second only for a header
    over 100 kB), `HEADER_READERS` at once, no HEAD or index request (the file list and the index came when the
    parent was located). Refused here, in the files' order whatever order the answers arrive in (the same line run to
    run): a file the repo lacks, an empty one, a corrupt header (`hub_header_refusal`), the Hub's other answers
    (`hub_request`'s line), a tensor stored in two files, a tensor the index places in a shard that lacks it."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import SafetensorsParsingError

    names = hub_weight_names(located)
    if not names:
        return {}
    reference = located.reference
    api = HfApi()

    def read(name: str) -> Any:
        """The header of file `name`, or the exception reading it ended in (raised below, in the files' order)."""
        try:
            header = hub_request(reference, lambda: api.parse_safetensors_file_metadata(
                located.repo_id, name, revision=located.commit_sha, token=token,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT), what=f"reading the header of {name}")
            if not all(_proper_tensor_info(info) for info in header.tensors.values()):
                raise ValueError("a tensor entry is not {dtype, shape, data_offsets}")
            return header
        except (LoadError, SafetensorsParsingError) as error:  # a LoadError is a ValueError: `hub_request`'s words
            return error
        except (AttributeError, TypeError, ValueError) as error:
            # huggingface_hub's parser takes any JSON: '[]' or '{"w": 5}' end in its AttributeError/TypeError
            unrecognized = LoadError(corrupt_file_line(reference, name, "header format not recognized", hub=True))
            unrecognized.__cause__ = error
            return unrecognized
        except Exception as error:  # noqa: BLE001 - handed back to the caller's thread, which raises or maps it
            return error

    if len(names) == 1:
        logger.info("reading the header of %s of %s", names[0], located.repo_id)
        headers = [read(names[0])]
    else:
        logger.info("reading %d shard headers of %s", len(names), located.repo_id)
        with ThreadPoolExecutor(max_workers=min(HEADER_READERS, len(names)),
                                thread_name_prefix="hf-mudsc-headers") as pool:
            headers = list(pool.map(read, names))
    stored_in: dict[str, str] = {}
    for name, header in zip(names, headers):
        if isinstance(header, BaseException):
            refusal = hub_header_refusal(reference, name, header)
            if refusal is not None:
                raise refusal from (header.__cause__ if isinstance(header, LoadError) else header)
            raise header
        refuse_stored_twice(reference, stored_in, header.tensors, name, hub=True)
    if SAFETENSORS_INDEX in located.weight_files:
        refuse_lost_tensor(reference, located.folder, stored_in, hub=True)
    return dict(zip(names, headers))


def check_hub_shard_headers(located: _Located, *, token: str | bool | None) -> None:
    """Refuse a Hub checkpoint from its safetensors headers, read over HTTP (`read_hub_headers`), before any weight
    file is downloaded: a tensor stored in two shards, a tensor the index places in a shard that lacks it, a corrupt
    header, a config its weights do not fit — what `_prepare` finds once the files are local, which for a checkpoint
    of many GB was only after downloading it (and every parent before it). A single model.safetensors too: its
    corrupt header was refused only after its whole download. Files already in the snapshot are read there, by
    `_prepare`, with no request."""
    from huggingface_hub import constants

    from hf_mudsc.load.lazy import dtype_name

    if (located.repo_id is None or constants.HF_HUB_OFFLINE or located.use_pickle or located.prepared
            or located.headers_read or located.loaded is not None or located.model is not None
            or located.folder is None):
        return
    names = hub_weight_names(located)
    if not names or all((located.folder / name).is_file() for name in names):
        return
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for header in read_hub_headers(located, token=token).values():
        for key, tensor in header.tensors.items():
            shapes[key], dtypes[key] = tuple(tensor.shape), dtype_name(tensor.dtype)
    check_config_fits_weights(located, (shapes, dtypes))
    located.headers_read, located.header_shapes = True, shapes


def _prepare(located: _Located, *, token: str | bool | None, cache_dir: str | os.PathLike | None) -> None:
    """Fetch a parent's weight files and check what their headers tell (intact files, a config that fits them,
    floating-point weights) without loading them: the loaders run this for every parent and the base before
    loading any, so a bad last parent is refused before the first one is read."""
    if located.loaded is not None or located.prepared:
        return
    if located.model is not None:
        check_floating_weights(located.reference, {name: str(tensor.dtype).removeprefix("torch.")
                                                   for name, tensor in located.model.named_parameters()},
                               located.model)
    else:
        check_hub_shard_headers(located, token=token)  # load_parent: no pass over every parent's headers before
        _fetch_weights(located, token=token, cache_dir=cache_dir)
        check_weight_files(located.reference, located.folder, located.weight_files)
        if located.use_pickle:
            located.stored_dtype = _check_pickle_dtypes(located)
        elif located.repo_id is not None:  # a local folder's headers were checked when it was located
            check_config_fits_weights(located)
    located.prepared = True


def _finish(located: _Located, *, token: str | bool | None, cache_dir: str | os.PathLike | None,
            lazy: bool = False, view: LoadedParent | None = None) -> LoadedParent:
    """A located parent loaded (`lazy`: opened for reading one tensor at a time where it can be; `view`: the one
    `_finish_lazily` already opened, used as it is)."""
    if located.loaded is not None:
        return located.loaded
    _prepare(located, token=token, cache_dir=cache_dir)
    stored = stored_dtype(located)  # before from_pretrained(dtype=float32) sets the config's dtype to float32
    if located.model is not None:  # named by its folder or Hub repo only if that holds exactly its weights
        source = object_source(located.model, own_name_or_path(located.model))
        processor = located.processor
        if source and source.commit_sha and not getattr(located.model.config, "_commit_hash", None):
            # located before its snapshot was known: the processor came from the repo's default revision, and the
            # snapshot holding its weights (the commit recorded) may be an older one with other preprocessing: that
            # snapshot's processor, or none (not another commit's)
            processor = processor_from_name(source.repo_id or source.reference, source.commit_sha)
        return LoadedParent(model=_as_float32(located.model), processor=processor,
                            reference=source.reference if source else object_reference(located.model),
                            repo_id=source and source.repo_id, commit_sha=source and source.commit_sha,
                            stored_dtype=stored, from_object=True)
    if lazy and not located.use_pickle:
        parent = view if view is not None else _finish_lazily(located)
        if parent is not None:
            parent.stored_dtype = stored
            return parent
    model, absent = _load_weights(located)
    # The Hub id identifies a Hub parent (the snapshot path is a cache artefact); a folder, what was passed.
    model.config._name_or_path = located.repo_id or located.reference
    model.name_or_path = model.config._name_or_path
    model = _as_float32(model).eval()
    logger.info("loaded %s%s", located.reference, f" at commit {located.commit_sha}" if located.commit_sha else "")
    return LoadedParent(model=model, processor=located.processor, reference=located.reference,
                        repo_id=located.repo_id, revision=located.revision, commit_sha=located.commit_sha,
                        absent=frozenset(absent), stored_dtype=stored)


def dtype_description(dtypes: Iterable[Any]) -> str | None:
    """How weights are stored, from their dtypes (torch dtypes or names): `float16` when every floating-point one is,
    `float16/float32` for a mix, None when none is floating-point."""
    names = sorted({n for n in (str(d).removeprefix("torch.") for d in dtypes) if n.startswith(("float", "bfloat"))})
    return "/".join(names) or None


def stored_dtype(located: _Located) -> str | None:
    """The dtype a located parent's weights are stored in (`LoadedParent.stored_dtype`): a model object's own
    parameters, else its safetensors headers or pickle tensors, else its config's `dtype`; None when unknown."""
    if located.model is not None:
        return dtype_description(t.dtype for t in located.model.parameters())
    found = located.stored_dtype
    if found is None and located.folder is not None and not located.use_pickle:
        from hf_mudsc.load.lazy import LazyParameters, safetensors_files

        files = safetensors_files(located.folder)
        if files:
            stored = LazyParameters(files)
            model = meta_model(located.config, located.read_as, reference=located.reference,
                               options=built_with(located))
            found = dtype_description(weight_dtypes(model, {key: stored.stored_dtype(key) for key in stored}))
    if found is None and located.config is not None and getattr(located.config, "dtype", None) is not None:
        found = dtype_description([located.config.dtype])
    return found


def weight_dtypes(model: Any, stored: Mapping[str, Any]) -> list[Any]:
    """The stored dtypes (`stored`: checkpoint key -> dtype) of the tensors that load as `model`'s parameters, named
    as `from_pretrained` names them (`lazy.stored_keys`): a tensor no parameter takes is dropped on load, so it stores
    no weight and must not decide `out_dtype` (docs/design.md §4.7). Every dtype when the keys cannot be named.
    Public: the dry run reads the headers' dtypes alike."""
    from hf_mudsc.load.lazy import stored_keys

    names = stored_keys(model, stored) if isinstance(model, PreTrainedModel) else None
    if not names:
        return list(stored.values())
    return [stored[key] for key in names.values()]


def check_config_fits_weights(located: _Located,
                              headers: tuple[Mapping[str, tuple[int, ...]], Mapping[str, str]] | None = None) -> None:
    """Refuse a config.json whose model is far larger than its safetensors checkpoint, from the headers and a model
    on the meta device, before `from_pretrained` allocates it (a hidden_size of 10**9 over a 65 kB file asked for
    68 GB). Smaller disagreements are left to `_load_weights`, which names the tensors that do not fit. `headers`:
    `(shapes, dtypes by torch's name)` by key when read elsewhere (a Hub checkpoint's, before its download), else
    read from the files in the folder."""
    from hf_mudsc.load.lazy import LazyParameters, safetensors_files

    if headers is None:
        files = safetensors_files(located.folder)
        if not files:
            return
        stored = LazyParameters(files)
        headers = ({key: stored.shape(key) for key in stored}, {key: stored.stored_dtype(key) for key in stored})
    shapes, dtypes = headers
    model = meta_model(located.config, reference=located.reference)
    needed = sum(tensor.numel() for tensor in model.parameters())
    held = sum(math.prod(shape) for shape in shapes.values())
    if needed > 2 * held + 2**26:  # tied tensors are saved once; 2**26 float32 values are 256 MB
        raise LoadError(f"{located.reference!r}: config.json describes a model of {needed:,} parameters, but "
                        f"{located.weight_files[0]} holds {held:,} values; {CONFIG_FIX}")
    check_floating_weights(located.reference, dtypes, model)


WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes a weight is read from as it is (torch's names, as `lazy.dtype_name` gives a safetensors header's)."""


def check_floating_weights(reference: str, stored: Mapping[str, str], model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose weights are stored as anything but float16/bfloat16/float32/float64 (`WEIGHT_DTYPES`):
    a quantized checkpoint's int8 or scaled float8 values are weights only together with the scales it keeps in side
    tensors, and `from_pretrained(dtype=float32)` would cast the bare values into the model — a garbage merge without
    a warning. An allow-list, so a dtype added later (float4, float8 variants) is refused too. `stored`: tensor
    name -> dtype name (`float32`, `int8` ...) as stored; `model`: the parent's model (on the meta device: its class
    and config).

    A torch parameter is always floating-point, so the only integer tensors a model takes from a checkpoint are its
    buffers (BERT's `position_ids`, `token_type_ids`). A stored tensor is one of them only when its full key loads as
    a buffer, the key named as `from_pretrained` names it (`lazy.stored_keys`: transformers' renames, the base-model
    prefix): a tensor merely called like a buffer elsewhere (`...dense.position_ids`) is not let through.
    """
    from hf_mudsc.load.lazy import stored_keys

    odd = [key for key, dtype in stored.items() if dtype not in WEIGHT_DTYPES]
    if not odd:
        return
    buffers = {name for name, _ in model.named_buffers()}
    names = stored_keys(model, stored, buffers=True) if isinstance(model, PreTrainedModel) else None
    if names is not None:
        buffer_keys = {key for name, key in names.items() if name in buffers}
    else:  # keys transformers converts beyond renaming: a buffer's own name, with or without the model's prefix
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        buffer_keys = buffers | {name.removeprefix(prefix) for name in buffers}
    bad = sorted(key for key in odd if key not in buffer_keys)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LoadError(
            f"{reference!r}: its weight {bad[0]!r}{more} is stored as {stored[bad[0]]}, not as "
            f"{'/'.join(WEIGHT_DTYPES)} floating-point numbers — a quantized checkpoint, whose values are weights only "
            "with their scales; dequantize it to float (e.g. load it with its quantization library and "
            "save_pretrained the float model) or use the float checkpoint it was quantized from"
        )


def _check_pickle_dtypes(located: _Located) -> str | None:
    """`check_floating_weights` for a pickle checkpoint (`allow_pickle`): its tensors' dtypes read onto the meta
    device (weights-only unpickling, no tensor data read); returns how its weights are stored (`dtype_description`).
    A file that would run code when unpickled (it names the callable) is refused here, before any parent is loaded;
    another file that cannot be read so is left to `_load_weights`, which names the problem (None)."""
    import pickle

    stored: dict[str, str] = {}
    names = [name for weight_file in located.weight_files for name in (
        _shard_names(located.reference, located.folder, weight_file) if weight_file.endswith(".index.json")
        else [weight_file])]
    for name in names:
        try:
            tensors = torch.load(located.folder / name, map_location="meta", weights_only=True)
        except pickle.UnpicklingError as error:
            if _unsafe_global(error) != "code":  # it names the callable it would run: refused before any parent loads
                raise _code_in_pickle(located.reference, name, error) from error
            return None
        except (RuntimeError, EOFError, OSError, ValueError):
            return None
        if not isinstance(tensors, Mapping):
            return None
        stored.update({key: str(tensor.dtype).removeprefix("torch.") for key, tensor in tensors.items()
                       if isinstance(tensor, torch.Tensor)})
    model = meta_model(located.config, reference=located.reference)
    check_floating_weights(located.reference, stored, model)
    return dtype_description(stored.values())


def check_local_pickle_weights(located: _Located) -> bool:
    """The merge's header-pass check of a pickle checkpoint (`_check_pickle_dtypes`: a file that would run code when
    unpickled, weights that are not floating point) for a dry run, which fetches no weights: run on the files already
    on this machine (a local folder, a cached snapshot). Returns whether it ran (False: a Hub parent's pickle files
    are not here, so the dry run cannot judge them)."""
    if not located.use_pickle or located.folder is None or located.loaded is not None or located.model is not None:
        return True
    names = [name for weight_file in located.weight_files for name in (
        [weight_file] if not weight_file.endswith(".index.json") or not (located.folder / weight_file).is_file()
        else [weight_file, *_shard_names(located.reference, located.folder, weight_file)])]
    if not names or not all((located.folder / name).is_file() for name in names):
        return False
    _check_pickle_dtypes(located)
    return True


def _finish_lazily(located: _Located) -> LoadedParent | None:
    """A parent whose tensors are read on access (a model on the meta device + `LazyParameters`), or None when
    the checkpoint's tensors are not exactly the model's parameters with their shapes (tied weights saved once,
    tensors transformers splits or joins on load ...): then `_load_weights` loads it, and reports what does not fit.
    Checkpoint keys are named as `from_pretrained` names them (`lazy.stored_keys`, transformers' conversion
    mapping): a ViT checkpoint, whose keys transformers 5 renames on load, is read lazily too. A base of another head
    class (`located.read_as`) is opened as the parents' class, as `_load_weights` reads it: the parameters its
    checkpoint lacks are `absent`, not read."""
    from hf_mudsc.load.lazy import LazyParameters, lazy_parameters

    model = meta_model(located.config, located.read_as, reference=located.reference, options=built_with(located))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.named_parameters()}
    if located.read_as is None:
        parameters = lazy_parameters(located.folder, names=list(shapes), dtype=torch.float32, model=model)
        missing: list[str] = []
    else:
        stored = lazy_parameters(located.folder, dtype=torch.float32, model=model)
        if stored is None:
            return None
        held = [name for name in shapes if name in stored]
        missing = [name for name in shapes if name not in stored]
        _refuse_missing_backbone(located, missing, {name: math.prod(shape) for name, shape in shapes.items()})
        parameters = LazyParameters(stored.files, names=held, keys={name: stored.key(name) for name in held},
                                    dtype=torch.float32)
        shapes = {name: shape for name, shape in shapes.items() if name in parameters}
    if parameters is None or any(parameters.shape(name) != shape for name, shape in shapes.items()):
        return None
    if located.read_as is not None:
        used = {parameters.key(name) for name in parameters}
        _log_read_as(located, missing, sorted(key for key in LazyParameters(parameters.files) if key not in used))
    model.config._name_or_path = model.name_or_path = located.repo_id or located.reference
    logger.info("opened %s%s (tensors read one at a time)", located.reference,
                f" at commit {located.commit_sha}" if located.commit_sha else "")
    return LoadedParent(model=model.eval(), processor=located.processor, reference=located.reference,
                        repo_id=located.repo_id, revision=located.revision, commit_sha=located.commit_sha,
                        parameters=parameters, absent=frozenset(missing))


def _refuse_missing_backbone(located: _Located, missing: Sequence[str], sizes: Mapping[str, int]) -> None:
    """Refuse a base read as the parents' class whose checkpoint lacks most of that class's values (`missing`:
    the parameters it does not hold; `sizes`: every parameter's element count): a head and a pooler are a small
    part, a backbone under other names is not."""
    lacking = sum(sizes.get(name, 0) for name in missing)
    if 2 * lacking > sum(sizes.values()):
        cls = located.read_as.__name__ if located.read_as is not None else "?"
        raise ParentMismatchError(
            f"the base {located.reference!r} read as {cls} lacks {len(missing)} "
            f"of its {len(sizes)} tensors (e.g. {', '.join(map(repr, missing[:3]))}): its checkpoint does not "
            "hold the parents' backbone; pass the base the parents were fine-tuned from")


def parameters_of(parent: LoadedParent) -> Mapping[str, torch.Tensor]:
    """A loaded parent's parameters by name (CPU tensors, never to be modified): read lazily, or the model's."""
    if parent.parameters is not None:
        return parent.parameters
    return {name: tensor.detach().cpu() for name, tensor in parent.model.named_parameters()}


def saved_without_pooler(cls: type[PreTrainedModel], missing: Sequence[str], unused: Sequence[str],
                          mismatched: Sequence[Any]) -> bool:
    """Whether a checkpoint lacks exactly the pooler of a bare model class that can be built without one."""
    return (bool(missing) and not unused and not mismatched and all(key.startswith("pooler.") for key in missing)
            and "add_pooling_layer" in inspect.signature(cls.__init__).parameters)


def stored_names(model: PreTrainedModel, located: _Located, names: Sequence[str]) -> list[str]:
    """`names` reported by `from_pretrained` (renamed on load) as the checkpoint's safetensors headers store them,
    so that a message names what the user can find in the file; as given when not found (or pickle)."""
    from hf_mudsc.load.lazy import checkpoint_keys, loaded_names, safetensors_files

    files = safetensors_files(located.folder) if located.folder is not None and not located.use_pickle else None
    if not files:
        return list(names)
    back = loaded_names(model, checkpoint_keys(files))
    return [back.get(name, name) for name in names]


def _load_weights(located: _Located) -> tuple[PreTrainedModel, list[str]]:
    """`from_pretrained` on the located folder, refusing weights that the config does not describe: the model and
    the parameters its checkpoint lacks (only ever for a base read as the parents' class, `located.read_as`).

    transformers fills tensors missing from the checkpoint with random values (a config that names another
    architecture loads as a random model); here every tensor must come from the file, with the config's shape —
    except for a base of another head class, whose missing tensors (the parents' head ...) are returned, so that
    the merge treats them as absent from the base instead of using their random values.
    Pickle is read with `weights_only=True` even under `allow_pickle`, so a pickle that runs code is refused.
    """
    import pickle

    from safetensors import SafetensorError

    cls = located.read_as or model_class_for(located.config, located.reference)
    name = located.weight_files[0]
    try:
        with _without_load_report():
            model, info = cls.from_pretrained(
                located.folder, config=located.config, dtype=torch.float32,
                use_safetensors=False if located.use_pickle else True, trust_remote_code=False,
                weights_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **built_with(located),
            )
    except pickle.UnpicklingError as error:
        raise _code_in_pickle(located.reference, name, error) from error
    except (SafetensorError, OSError, EOFError, RuntimeError) as error:
        raise LoadError(f"{located.reference!r}: cannot read the weights in {name} ({first_line(error)}); "
                        "download them again or re-save the model with save_pretrained") from error
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError, AssertionError) as error:
        # a config value transformers reads only as it builds and initialises the model (initializer_factor null)
        raise LoadError(f"{located.reference!r}: transformers cannot load {name} into the {cls.__name__} config.json "
                        f"describes ({type(error).__name__}: {first_line(error)}); {CONFIG_FIX}") from error
    missing, unused = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if located.read_as is None and saved_without_pooler(cls, missing, unused, mismatched):
        # A bare encoder built with add_pooling_layer=False (e.g. an embedding model's): its config cannot say so.
        # The model read holds every tensor of the file: dropping its (randomly initialised) pooler is exactly what
        # add_pooling_layer=False builds — the file is not read a second time, nor two models held at once.
        logger.info("%s: no pooler in %s: read as %s(add_pooling_layer=False)", located.reference, name, cls.__name__)
        model.pooler = None
        return model, []
    if located.read_as is not None and not mismatched:
        _refuse_missing_backbone(located, missing, {name: tensor.numel() for name, tensor in model.named_parameters()})
        _log_read_as(located, missing, unused)
        return model, missing
    stored = stored_names(model, located, unused[:3]) if unused else []
    if missing or mismatched:
        raise LoadError(config_weights_refusal(located.reference, name, cls.__name__, missing, mismatched, stored,
                                               len(unused)))
    if unused:
        logger.warning("%s: %d tensors of the checkpoint are unused (e.g. %s)", located.reference, len(unused),
                       ", ".join(map(repr, stored)))
    return model, []


def weights_refusal(reference: str, model: Any, shapes: Mapping[str, Sequence[int]], file: str) -> str | None:
    """The loader's refusal of a checkpoint whose config.json does not describe its weights — tensors the config
    needs that the headers lack, or other shapes (`model`: built on the meta device from that config; `shapes`: the
    headers' shapes by stored key) — or None: the dry run reads the headers, so it refuses what the merge would, in
    the same words (`_load_weights`). Public: the dry run reads the headers alike."""
    from hf_mudsc.load.lazy import stored_keys

    named = stored_keys(model, shapes)
    if named is None:
        return None
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    missing = sorted(name for name, _ in model.named_parameters()
                     if name not in named and not any(pattern.search(name) for pattern in ignored))
    mismatched = sorted((name, tuple(shapes[named[name]]), tuple(p.shape)) for name, p in model.named_parameters()
                        if name in named and tuple(shapes[named[name]]) != tuple(p.shape))
    if missing and saved_without_pooler(type(model), missing, (), mismatched):
        missing = []  # a bare encoder saved with add_pooling_layer=False: read without its pooler
    if not missing and not mismatched:
        return None
    return config_weights_refusal(reference, file, type(model).__name__, missing, mismatched)


def check_weights_fit(located: _Located) -> None:
    """Refuse a parent whose config.json does not describe its safetensors weights (tensors missing, other shapes),
    from the headers in its folder (or a Hub checkpoint's read over HTTP, `check_hub_shard_headers`), before any
    parent is loaded: `_load_weights` found it only in `from_pretrained`, after loading (and downloading) every parent
    before it. The dry run refuses from the same headers in the same words (`weights_refusal`). Parents only: a base
    may be read as another class (`check_base_config`). Headers not at hand yet: checked when called again."""
    from hf_mudsc.load.lazy import LazyParameters, safetensors_files

    if (located.weights_fit or located.loaded is not None or located.model is not None or located.use_pickle
            or located.folder is None or located.read_as is not None or located.config is None):
        return
    shapes = located.header_shapes
    if shapes is None:
        files = safetensors_files(located.folder)
        if not files or not all(file.is_file() for file in files):
            return
        stored = LazyParameters(files)
        shapes = {key: stored.shape(key) for key in stored}
    model = meta_model(located.config, reference=located.reference, options=built_with(located, shapes))
    refusal = weights_refusal(located.reference, model, shapes, located.weight_files[0])
    if refusal is not None:
        raise LoadError(refusal)
    located.weights_fit = True


def _log_read_as(located: _Located, missing: Sequence[str], unused: Sequence[str]) -> None:
    """One line: a base of another head class was read as the parents' class, and which tensors it did not provide
    (merged as when the base has no head) or held beyond the parents' class (its own head: not read)."""
    cls = located.read_as.__name__ if located.read_as is not None else "?"
    logger.info("the base %r is a %s, the parents are %s: read as %s; %d tensors it does not hold are merged as "
                "without a base (%s); %d tensors of its own head are not used%s", located.reference,
                _architecture(located), cls, cls, len(missing), ", ".join(missing) or "none", len(unused),
                f" (e.g. {', '.join(unused[:3])})" if unused else "")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Silence transformers' screen-long key table while loading: `_load_weights` reports the same facts in
    one line (an error for missing or reshaped tensors, a warning for unused ones)."""
    target = logging.getLogger("transformers.modeling_utils")
    dropper = _DropLoadReport()
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


def _code_in_pickle(reference: str, name: str, error: BaseException) -> LoadError:
    """The refusal of pickle file `name`, whose weights-only unpickling stopped at `error`: it holds more than
    tensors, and would run code if unpickled otherwise."""
    return LoadError(
        f"{reference!r}: {name} holds more than tensors — unpickling it would call {_unsafe_global(error)}, and "
        "hf_mudsc refused to run it (weights_only loading). Do not use this file; convert the checkpoint to "
        "safetensors from a trusted copy")


def _unsafe_global(error: BaseException) -> str:
    """The callable a refused pickle wanted to run, as torch names it (or a generic phrase)."""
    import re

    # torch says "Unsupported global: GLOBAL numpy._core.multiarray._reconstruct" (the opcode, then the callable),
    # or "global: posix.system": the name after GLOBAL first, so the opcode is never taken for the callable
    found = re.search(r"\bGLOBAL\s+([\w.]+)", str(error)) or re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(error))
    return found.group(1) if found else "code"


def _locate_with_processor(ref: Any, *, token, allow_pickle, cache_dir, for_merge: bool = False) -> _Located:
    """`ref` located with its processor; `for_merge`: refused first when no adapter merges its model_type."""
    located = _locate(ref, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir, for_merge=for_merge)
    if located.folder is not None:
        located.processor = load_processor(located.folder, located.reference)
        if located.processor is None:
            located.processor_problem = unreadable_tokenizer(located.folder, located.reference)
    return located


def check_saved_processor(located: Sequence[_Located]) -> None:
    """Refuse parent A's processor, the one a merged model's folder saves, when it could not be saved (a chat
    template named by a path: `processors.refuse_unsavable_chat_templates`) — before any weights are read. The
    other parents' and the base's processors are never saved, so they are not refused."""
    if not located:
        return
    first = located[0]
    processor = first.loaded.processor if first.loaded is not None else first.processor
    if processor is not None:
        refuse_unsavable_chat_templates(repr(first.reference), processor)


def load_parent(ref: Any, *, token: str | bool | None = None, allow_pickle: bool = False,
                cache_dir: str | os.PathLike | None = None) -> LoadedParent:
    """One parent: a `PreTrainedModel`, a `LoadedParent`, a local folder, or `org/name[@revision]`.

    Hub parents are pinned: the revision is resolved to a commit sha first and every file is fetched
    at that sha (`LoadedParent.commit_sha`). Objects are used as given (a float32 copy only if needed).
    """
    located = _locate_with_processor(ref, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
    check_model_objects([located], [repr(located.reference)])
    return _finish(located, token=token, cache_dir=cache_dir)


def load_parents(refs: Sequence[Any], *, token: str | bool | None = None, allow_pickle: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> list[LoadedParent]:
    """Several parents, checked against each other before any weights are downloaded.

    Configurations must agree and text parents must share one vocabulary; a pickle-only checkpoint
    is refused unless `allow_pickle=True`. Remote code is never run.
    """
    if isinstance(refs, (str, os.PathLike, PreTrainedModel)):
        raise LoadError("load_parents takes a list of parents, e.g. ['org/a', 'org/b@v2']")
    located = [_locate_with_processor(r, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir, for_merge=True)
               for r in refs]
    check_model_objects(located)
    agree_on_constructor_options(located)
    check_configs(located)
    names_known = check_parameter_names(located)
    check_objects_complete(located)
    warning = check_vocabularies(located)
    for parent in located:
        check_hub_shard_headers(parent, token=token)
        check_weights_fit(parent)  # a folder's headers, or a sharded Hub checkpoint's just read: before any download
    for parent in located:
        _prepare(parent, token=token, cache_dir=cache_dir)
    for parent in located:
        check_weights_fit(parent)  # a single-file Hub checkpoint's, now downloaded: before any parent is loaded
    if not names_known:
        check_parameter_names(located)
    return _warned([_finish(p, token=token, cache_dir=cache_dir) for p in located], warning)


def _warned(parents: list[LoadedParent], warning: str | None) -> list[LoadedParent]:
    """The parents loaded together, each marked with the vocabulary warning said for them (`check_vocabularies`)."""
    if warning is not None:
        for parent in parents:
            parent.vocabulary_warning = warning
    return parents


# How the log, the config and the card say where a base came from when it was not given.
BASE_FROM_CARDS = "named as base_model by every parent's model card"


def load_parents_and_base(refs: Sequence[Any], base: Any = None, *, base_needed_for: str | None = None,
                          token: str | bool | None = None, allow_pickle: bool = False,
                          cache_dir: str | os.PathLike | None = None, lazy: bool = False,
                          check_config: Callable[[PretrainedConfig | PreTrainedModel, list[Any], Any], None]
                          | None = None,
                          before_weights: Callable[[list[Any], list[str | None]], None] | None = None,
                          choose_loading: Callable[[list[LoadedParent], Any, LoadedParent | None], bool]
                          | None = None,
                          found_base: Callable[[str], None] | None = None,
                          ) -> tuple[list[LoadedParent], LoadedParent | None, str | None]:
    """N parents and their common base (`base`: a reference, model or `LoadedParent`, or None), checked against
    each other before any weights are downloaded: `(parents, base or None, where the base came from or None)`.
    `lazy`: parents after the first and the base are opened for reading one tensor at a time (`LoadedParent.
    parameters`) where their weights are safetensors (docs/design.md §4.10, streaming).

    The base is loaded like a parent (pinned, safetensors unless `allow_pickle`, float32) and must be of the
    parents' class and configuration (labels aside), or of another head class of their model type with their backbone
    (read as their class: `check_base_config`). `check_config(config, parents, base)`: the caller's own check of the
    first parent's configuration (its model instead, for a parent given as a model), also before any weights, once
    the base is found and checked (the memory check counts it); `parents`: every parent's configuration, parent A's
    first (a parent given as a model or `LoadedParent`: that object); `base`: the base likewise, or None (`unloaded`).
    `before_weights(processors, problems)`: called with the parents' processors (None where a parent ships none, or
    one it cannot read: why, in `problems`, else None) once every
    configuration has passed its checks, before any weights are read (the calibration data is opened and its columns
    checked against the processors there: a config refusal comes before the data is touched, a bad data spec or a
    column no processor can read still before any weights are downloaded). Without
    `base`, when `base_needed_for` names a method that needs one, the base is the `base_model` every parent's model
    card names (README.md front matter; Hub parents' cards at their pinned commit); if they name none or different
    ones, a one-line `MergeInputError`. `found_base(reference)`: called with that base's reference as soon as it is
    found, before anything else is read (the caller refuses an output inside it, as for a base it was given).

    `choose_loading(views, base, base_view)`: called once every parent's weights are fetched and their headers checked,
    before any parent is loaded, with every parent opened for reading one tensor at a time (`_finish_lazily`), the base
    as `check_config` gets it (None without one) and the base opened alike when it can be (else None); it returns
    `lazy` (method `auto` chooses here, from the weights, and
    checks the memory its choice needs before any parent is loaded whole). Not called when a parent cannot be opened so
    (a model object, pickle weights, tensors that are not exactly its model's): the caller then chooses after
    loading.
    """
    if isinstance(refs, (str, os.PathLike, PreTrainedModel)):
        raise LoadError("load_parents takes a list of parents, e.g. ['org/a', 'org/b@v2']")
    located = [_locate_with_processor(r, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir, for_merge=True)
               for r in refs]
    check_saved_processor(located)
    check_model_objects(located)
    agree_on_constructor_options(located)
    check_configs(located)
    names_known = check_parameter_names(located)
    check_objects_complete(located)
    located_base, source = locate_base(located, base, base_needed_for=base_needed_for, token=token,
                                       allow_pickle=allow_pickle, cache_dir=cache_dir)
    if found_base is not None and located_base is not None and source == BASE_FROM_CARDS:
        found_base(located_base.reference)
    for parent in located + ([located_base] if located_base is not None else []):
        check_hub_shard_headers(parent, token=token)  # before the calibration data is opened, too: a few requests
    for parent in located:  # a folder's headers, or a sharded Hub checkpoint's just read: before any download, and
        check_weights_fit(parent)  # before `check_config` builds the merge's spec from configs the dry run refused
    if check_config is not None and located[0].config is not None:
        check_config(located[0].model if located[0].model is not None else located[0].config,
                     [unloaded(p) for p in located], None if located_base is None else unloaded(located_base))
    warning = check_vocabularies(located + ([located_base] if located_base is not None else []))
    if before_weights is not None:
        before_weights([p.loaded.processor if p.loaded is not None else p.processor for p in located],
                       [p.processor_problem for p in located])
    for parent in located + ([located_base] if located_base is not None else []):
        _prepare(parent, token=token, cache_dir=cache_dir)
    for parent in located:
        check_weights_fit(parent)  # a single-file Hub checkpoint's, now downloaded: before any parent is loaded
    if not names_known:
        check_parameter_names(located)
    views: list[LoadedParent | None] = [None] * len(located)
    if choose_loading is not None and all(p.loaded is None and p.model is None and not p.use_pickle
                                          and p.read_as is None for p in located):
        views = [_finish_lazily(p) for p in located]
        if all(view is not None for view in views):
            base_view = (_finish_lazily(located_base) if located_base is not None and located_base.loaded is None
                         and located_base.model is None and not located_base.use_pickle else None)
            lazy = choose_loading(views, None if located_base is None else unloaded(located_base), base_view)
    # `lazy` (a tensor-wise method): every parent but the first (the merged model is built from it) and the base
    # with safetensors weights are read one tensor at a time, so memory does not grow with the number of parents.
    # The views `choose_loading` was given are those parents (opened once).
    parents = [_finish(p, token=token, cache_dir=cache_dir, lazy=lazy and i > 0, view=views[i])
               for i, p in enumerate(located)]
    loaded_base = (_finish(located_base, token=token, cache_dir=cache_dir, lazy=lazy)
                   if located_base is not None else None)
    if loaded_base is not None and source is not None:
        loaded_base.origin = source
    for loaded, where in zip(parents + ([loaded_base] if loaded_base is not None else []),
                             located + ([located_base] if located_base is not None else [])):
        loaded.license = _declared_license(where, token=token, cache_dir=cache_dir)
    _warned(parents + ([loaded_base] if loaded_base is not None else []), warning)
    return parents, loaded_base, source or (loaded_base.origin if loaded_base is not None else None)


def locate_base(located: Sequence[_Located], base: Any = None, *, base_needed_for: str | None = None,
                token: str | bool | None = None, allow_pickle: bool = False,
                cache_dir: str | os.PathLike | None = None) -> tuple[_Located | None, str | None]:
    """The parents' base located (config and processor, no weights) and checked against parent A's configuration:
    `(base or None, where it came from or None)`. Without `base`, when `base_needed_for` names a method that needs
    one, the base every parent's model card names, else a one-line `MergeInputError`. The merge and its dry run
    (`locate_parents`) both find the base here, so they refuse the same bases with the same message."""
    source = None
    if base is None and base_needed_for is not None:
        base = base_from_cards(located, token=token, cache_dir=cache_dir)
        if base is None:
            from hf_mudsc.errors import option_hint

            raise MergeInputError(
                f"method {base_needed_for!r} needs the parents' common base model and none was given; pass "
                f"{option_hint('base')} (a Hub id `org/name[@revision]` or a folder), or choose a method that needs "
                "no base (CLI: --method linear)"
            )
        source = BASE_FROM_CARDS
        logger.info("base model %s: %s", base, BASE_FROM_CARDS)
    if base is None:
        return None, None
    try:
        try:
            located_base = _locate_with_processor(base, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir,
                                                  for_merge=True)
        except UnsupportedArchitectureError as error:  # supported parents: the base is not of their type
            parent_type = getattr(located[0].config, "model_type", None)
            shown_base = base if isinstance(base, (str, os.PathLike)) else type(base).__name__
            raise ParentMismatchError(
                f"the base {str(shown_base)!r} is not of the parents' model type ({parent_type}): "
                f"{str(error).split(';')[0]}, so the parents are not fine-tunes of it; pass the base the parents were "
                "fine-tuned from") from None
        check_model_objects([located_base], [f"the base {located_base.reference!r}"], shapes=False)
        check_base_config(located_base, located[0])
    except (LoadError, ParentMismatchError) as error:
        if source != BASE_FROM_CARDS:
            raise
        # a name the user never typed (the INFO line saying where it came from is hidden under -q): say so
        from hf_mudsc.errors import option_hint

        raise type(error)(f"the base model the parents' model cards name ({base!r}): {error}; pass "
                          f"{option_hint('base')} to merge from another base") from error
    return located_base, source


def unloaded(located: _Located) -> Any:
    """A located parent (or base) as the checks before weights see it: the `LoadedParent` or model it was given as,
    else its config (a reference still to be loaded)."""
    return located.loaded if located.loaded is not None else located.model if located.model is not None else (
        located.config)


def check_base_config(base: _Located, parent: _Located) -> None:
    """Refuse a base of another model type or backbone configuration than the parents' (labels aside), before any
    weights. A checkpoint of another head class of the parents' model type (a `BertForMaskedLM` or `BertModel` for
    `BertForSequenceClassification` fine-tunes: what Hub cards name as base_model) is read as the parents' class
    (`base.read_as`); its head-only config fields may differ."""
    if base.config is None or parent.config is None:
        return
    kind_base, kind_parent = _architecture(base), _architecture(parent)
    ignored: frozenset[str] = frozenset()
    if kind_base != kind_parent:
        type_base, type_parent = base.config.model_type, parent.config.model_type
        if type_base != type_parent:
            raise ParentMismatchError(
                f"the base {base.reference!r} is a {kind_base} but the parents are {kind_parent} (model type "
                f"{type_base!r}, not {type_parent!r}); pass the base the parents were fine-tuned from"
            )
        if base.model is not None or base.loaded is not None:
            raise ParentMismatchError(
                f"the base {base.reference!r} is a {kind_base} object but the parents are {kind_parent}; pass the "
                "base as a folder or Hub id (save_pretrained) so it is read as the parents' class"
            )
        ignored = HEAD_CONFIG_KEYS
    differences = config_differences(base.config, parent.config, ignored=ignored)
    if differences and (resized := resized_vocabulary(base, parent, ignored)) is not None:
        raise ParentMismatchError(resized)
    if differences:
        raise ParentMismatchError(
            f"the base {base.reference!r} has another configuration than the parents, so the parents are not "
            "fine-tunes of it: " + "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
            + ". Pass the base the parents were fine-tuned from"
        )
    if ignored:
        base.read_as = _parent_class(parent)


def vocabulary_sizes(config: PretrainedConfig) -> dict[str, Any]:
    """A config's `vocab_size` fields by where they are: "vocab_size", or "text_config.vocab_size" in a sub-config."""
    values = config.to_dict()
    sizes = {"vocab_size": values["vocab_size"]} if "vocab_size" in values else {}
    sizes.update({f"{key}.vocab_size": sub["vocab_size"] for key, sub in values.items()
                  if isinstance(sub, dict) and key.endswith("_config") and "vocab_size" in sub})
    return sizes


def resized_vocabulary(base: _Located, parent: _Located, ignored: Iterable[str] = ()) -> str | None:
    """The refusal of a base whose config differs from the parents' only in a smaller `vocab_size`: the parents'
    vocabulary was resized from it (tokens added with `resize_token_embeddings`), so they are its fine-tunes — the
    generic "not fine-tunes of it, pass the base they were fine-tuned from" would send the user looking for a base
    they already gave. None when anything else differs, or a parent vocabulary is smaller (no resize makes that)."""
    if config_differences(base.config, parent.config, ignored={*ignored, "vocab_size"}):
        return None
    ours, theirs = vocabulary_sizes(base.config), vocabulary_sizes(parent.config)
    grown = {key: (ours[key], theirs[key]) for key in ours.keys() & theirs.keys() if ours[key] != theirs[key]}
    if not grown or any(not isinstance(a, int) or not isinstance(b, int) or b < a for a, b in grown.values()):
        return None
    key, (old, new) = sorted(grown.items())[0]
    where = "" if key == "vocab_size" else f"{key.removesuffix('_config.vocab_size')} model's "
    from hf_mudsc.errors import option_hint

    # transformers resizes a top-level vocabulary only: a dual encoder's text tower (CLIPModel) has no
    # resize_token_embeddings, so there the one fix that works is a method without a base.
    resize = ("" if where else f"resize the base's token embeddings to {new} (resize_token_embeddings({new})), save it "
              f"(save_pretrained) and pass that as {option_hint('base')}, or ")
    return (f"the base {base.reference!r} has {old} tokens but the parents {new} ({key} {old} -> {new}): the parents' "
            f"vocabulary was resized from the base's (tokens added to the {where}embeddings), so their embeddings "
            f"have another shape than the base's; {resize}merge with a method that reads no base (e.g. "
            "method='linear')")


def _parent_class(parent: _Located) -> type[PreTrainedModel]:
    """The class a parent is (or will be) loaded as."""
    model = parent.model if parent.model is not None else (parent.loaded.model if parent.loaded else None)
    return type(model) if model is not None else model_class_for(parent.config, parent.reference)


# What `_card_text` gives for a Hub repo known to hold no README.md: an empty card, which declares nothing (no licence,
# no base), unlike a card that could not be read.
NO_CARD = ""


def _card_text(located: _Located, *, token: str | bool | None, cache_dir: str | os.PathLike | None) -> str | None:
    """A parent's model card (README.md) text: from its folder, or from the Hub at its pinned commit; `NO_CARD` when
    the Hub says the repo holds none; None if none is at hand (a folder without one, or not cached offline)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    loaded_model = located.loaded.model if located.loaded is not None else located.model
    folder = located.folder
    if folder is None and located.repo_id is None:
        # A model object or a LoadedParent from a folder: its reference may be that folder.
        for candidate in (located.reference, getattr(getattr(loaded_model, "config", None), "_name_or_path", "")):
            if candidate and Path(str(candidate)).expanduser().is_dir():
                folder = Path(str(candidate)).expanduser()
                break
    if located.repo_id is not None and (folder is None or not (folder / "README.md").is_file()):
        if located.card_bytes is not None and located.card_bytes > SIDE_FILE_MAX_BYTES:
            card_too_large(located.reference, located.card_bytes, SIDE_FILE_MAX_BYTES)
            return None

        def download() -> str | None:
            try:
                return hf_hub_download(located.repo_id, "README.md", revision=located.commit_sha or located.revision,
                                       cache_dir=cache_dir, token=token, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                                       local_files_only=constants.HF_HUB_OFFLINE)
            except LocalEntryNotFoundError as error:  # none cached offline; online, the Hub's refusal is said
                if constants.HF_HUB_OFFLINE or http_cause(error) is None:
                    return None
                raise
            except EntryNotFoundError:  # no card (a parent class of the one above: after it)
                return NO_CARD

        path = hub_request(located.reference, download, what="downloading README.md (the model card)")
        return NO_CARD if path == NO_CARD else read_card(Path(path)) if path else None
    if folder is not None and (folder / "README.md").is_file():
        return read_card(folder / "README.md")
    return None


def _declared_license(located: _Located, *, token: str | bool | None,
                      cache_dir: str | os.PathLike | None) -> str | None:
    """The licence a parent's model card declares; None when it has no card (a folder or Hub repo without README.md, a
    model built in memory) or declares none; `LICENSE_NOT_READ` when a card may exist but was not read (a Hub card not
    cached offline, a Hub error, a card that is no text or too large): the merge never depends on it."""
    try:
        text = _card_text(located, token=token, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - a licence read must never fail a merge
        logger.info("%s: its model card could not be read for its licence (%s)", located.reference, brief(error, 200))
        return LICENSE_NOT_READ
    if text is not None:
        return card_license(text)
    if located.repo_id is not None:  # a Hub card not cached offline, or none on the Hub: not known which
        return LICENSE_NOT_READ
    folder = located.folder or (Path(located.reference).expanduser() if located.reference else None)
    if folder is None or not folder.is_dir():
        return None  # a model built in memory: no card
    return LICENSE_NOT_READ if (folder / "README.md").is_file() else None  # a card too large or no text; else none


def base_from_cards(located: Sequence[_Located], *, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None) -> str | None:
    """The base every parent's model card names (`base_model` in README.md), or None when any names none or
    they differ (logged)."""
    named = [card_base_model(_card_text(p, token=token, cache_dir=cache_dir)) for p in located]
    for index, (parent, base) in enumerate(zip(located, named)):
        if base is not None and parent.repo_id is not None and not hub_id_only(base):
            logger.warning("%s: its Hub model card names base_model %r, a local path: ignored (a card from the Hub "
                           "may not point hf-mudsc at a folder of this machine); pass base= (CLI: --base) to use it",
                           parent.reference, base)
            named[index] = None
    if named and all(n is not None for n in named) and len(set(named)) == 1:
        return named[0]
    logger.info("the parents' model cards do not name one common base_model: %s",
                ", ".join(f"{p.reference}: {n or 'none'}" for p, n in zip(located, named)))
    return None


def hub_id_only(reference: str) -> bool:
    """Whether `reference` can only mean a Hub repo (`org/name[@revision]`): a valid repo id that names no existing
    local path."""
    from huggingface_hub.utils import validate_repo_id

    try:
        name, _ = parse_reference(reference)
        validate_repo_id(name)
    except ValueError:  # LoadError too: a malformed reference
        return False
    return not Path(name).expanduser().exists()


def locate_parents(refs: Sequence[Any], base: Any = None, *, base_needed_for: str | None = None,
                   token: str | bool | None = None, allow_pickle: bool = False,
                   cache_dir: str | os.PathLike | None = None) -> tuple[list[_Located], _Located | None, str | None]:
    """The first phase of `load_parents_and_base` alone, for a dry run: revisions resolved, configs and processors
    read, configurations and vocabularies compared, the base found (`locate_base`: given, or named by the cards when
    `base_needed_for` names a method that needs one) and checked — no weight file fetched (`located.weight_files`
    names them). `(parents, base or None, where the base came from or None)`."""
    located = [_locate_with_processor(r, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir, for_merge=True)
               for r in refs]
    check_saved_processor(located)
    check_model_objects(located)
    agree_on_constructor_options(located)
    check_configs(located)
    check_parameter_names(located)
    check_objects_complete(located)
    located_base, source = locate_base(located, base, base_needed_for=base_needed_for, token=token,
                                       allow_pickle=allow_pickle, cache_dir=cache_dir)
    check_vocabularies(located + ([located_base] if located_base is not None else []))
    return located, located_base, source


def load_model(ref: PreTrainedModel | str | os.PathLike, *, allow_pickle: bool = False) -> PreTrainedModel:
    """A parent as a float32 model (kept for callers of the first API; prefer `load_parent`)."""
    return load_parent(ref, allow_pickle=allow_pickle).model


