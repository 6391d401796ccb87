"""The adapter table: `config.model_type` -> the function building that model's PermutationSpec.

Kept apart from the package `__init__` (which discovers the adapter modules) so that adapters import
`register` from here without importing the package that imports them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hf_mudsc.spec import PermutationSpec

SpecBuilder = Callable[[nn.Module], PermutationSpec]
_REGISTRY: dict[str, SpecBuilder] = {}


def register(*model_types: str) -> Callable[[SpecBuilder], SpecBuilder]:
    """Make the decorated builder the adapter of `model_types` (values of `config.model_type`)."""

    def decorator(builder: SpecBuilder) -> SpecBuilder:
        for model_type in model_types:
            _REGISTRY[model_type] = builder
        return builder

    return decorator


def unregister(*model_types: str) -> None:
    """Forget the adapters of `model_types` (for tests and notebooks that register one temporarily)."""
    for model_type in model_types:
        _REGISTRY.pop(model_type, None)


def builder_for(model_type: str) -> SpecBuilder | None:
    return _REGISTRY.get(model_type)


def registered_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
