"""Architecture adapters: `config.model_type` -> a function building the model's PermutationSpec.

Every module of this package (but the shared `registry` and `templates`) is an adapter: it is imported
on first lookup and registers its builders with `register`, so adding an architecture is adding one file
(see docs/adding_an_architecture.md); nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from hf_mudsc.architectures.registry import SpecBuilder, builder_for, register, registered_model_types, unregister
from hf_mudsc.errors import SpecError, UnsupportedArchitectureError, shown
from hf_mudsc.spec import PermutationSpec

__all__ = ["SpecBuilder", "adapter_modules", "check_config_supported", "discover", "register", "spec_for",
           "supported_model_types", "unregister", "UnsupportedArchitectureError"]

# Modules of this package that hold shared code, not adapters.
SHARED_MODULES = frozenset({"registry", "templates"})
_discovered = False


def adapter_modules() -> tuple[str, ...]:
    """The adapter modules found in this package (full dotted names)."""
    return tuple(
        f"{__name__}.{module.name}"
        for module in pkgutil.iter_modules(__path__)
        if module.name not in SHARED_MODULES and not module.name.startswith("_")
    )


def discover() -> None:
    """Import every adapter module once; each registers itself on import.

    On first lookup rather than at package import, so that importing the package stays cheap and an
    adapter's own imports never meet a half-initialised package. A builder the user registered before this first
    lookup stays the adapter of its model types: a shipped module registering itself on import does not replace it
    (as it would not after the first lookup).
    """
    global _discovered
    if not _discovered:
        earlier = {model_type: builder_for(model_type) for model_type in registered_model_types()}
        for name in adapter_modules():
            importlib.import_module(name)
        for model_type, builder in earlier.items():
            if builder is not None:
                register(model_type)(builder)
        _discovered = True


def supported_model_types() -> tuple[str, ...]:
    discover()
    return registered_model_types()


def unsupported(name: str, model_type: object) -> UnsupportedArchitectureError:
    """The refusal of a model of class `name` and `model_type` that no adapter merges."""
    return UnsupportedArchitectureError(
        f"hf_mudsc cannot merge {name} (model_type={shown(model_type)}); supported model types: "
        f"{', '.join(supported_model_types())}. Adding one is a new file in hf_mudsc/architectures/ "
        "(docs/adding_an_architecture.md)."
    )


# A class name as config.json's `architectures` gives it (the file is untrusted: anything else is not shown).
CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def check_config_supported(config: Mapping[str, Any]) -> None:
    """Refuse a parent whose config.json (the parsed file, `config`) names a model_type no adapter merges, in
    `spec_for`'s words, before transformers reads the config or builds its model: both act on what the file names
    (DETR's config fetches the backbone repository it names, its constructor imports timm and downloads weights)."""
    discover()
    model_type = config.get("model_type")
    if isinstance(model_type, str) and builder_for(model_type) is not None:
        return
    classes = config.get("architectures")
    first = classes[0] if isinstance(classes, list) and classes else None
    raise unsupported(first if isinstance(first, str) and CLASS_NAME.fullmatch(first) else "this model", model_type)


def built_without(model: nn.Module, name: str) -> bool:
    """Whether `model` has the module owning the parameter `name` and that module holds it as None, as
    `nn.Linear(bias=False)` holds its bias: the model's own layout, not a misspelt name."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return getattr(module, leaf, leaf) is None  # a parameter slot registered empty, not an absent name


def spec_for(model: nn.Module) -> PermutationSpec:
    """Build and validate the permutation spec of a loaded model."""
    discover()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    builder = builder_for(model_type or "")
    if builder is None:
        raise unsupported(type(model).__name__, model_type)
    spec = builder(model)
    try:
        spec.validate(dict(model.named_parameters()), (name for name, _ in model.named_modules()))
    except SpecError as error:
        # A tensor the spec names that the model lacks is the adapter's bug for a transformers class, and for any
        # other class too unless the model was built without it (a label head's Linear(bias=False)): else a typo in
        # an adapter (a user's own, registered for their own class) would read as the user's model's fault.
        absent = () if type(model).__module__.startswith("transformers.") else tuple(
            name for name in error.absent if built_without(model, name))
        if not (error.unplaced or absent) or len(error.problems) > len(error.unplaced) + len(absent):
            raise  # the adapter's own spec is wrong (too): its bug, with every problem listed
        if absent and not error.unplaced:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} is not supported: it lacks the parameter {absent[0]!r} the "
                f"{spec.family or model_type} adapter merges (a layer built otherwise than by its transformers "
                f"class); merge a class docs/design.md §5 lists for {model_type!r} models, built as transformers "
                "builds it") from None
        # A layout of a supported model type the adapter has no place for (an extra module, another head class):
        # one line naming the class and the tensor, not the spec's internal list (21 lines for a BERT decoder).
        more = f" (and {len(error.unplaced) - 1} more)" if len(error.unplaced) > 1 else ""
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported: the {spec.family or model_type} adapter has no place for its "
            f"parameter {error.unplaced[0]!r}{more}; merge a class docs/design.md §5 lists for {model_type!r} models "
            "(the backbone alone, e.g. the bare *Model, when the head is the part it cannot hold)") from None
    return spec
