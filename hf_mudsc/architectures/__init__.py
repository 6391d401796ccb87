"""Architecture adapters: `config.model_type` -> a function building the model's PermutationSpec.

Adding an architecture is adding one file that calls `register`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import PermutationSpec

SpecBuilder = Callable[[nn.Module], PermutationSpec]
_REGISTRY: dict[str, SpecBuilder] = {}




def register(*model_types: str) -> Callable[[SpecBuilder], SpecBuilder]:
    def decorator(builder: SpecBuilder) -> SpecBuilder:
        for model_type in model_types:
            _REGISTRY[model_type] = builder
        return builder

    return decorator


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def spec_for(model: nn.Module) -> PermutationSpec:
    """Build and validate the permutation spec of a loaded model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    builder = _REGISTRY.get(model_type or "")
    if builder is None:
        raise UnsupportedArchitectureError(
            f"hf_mudsc cannot merge {type(model).__name__} (model_type={model_type!r}); supported model types: "
            f"{', '.join(supported_model_types())}. Adding one is a new file in hf_mudsc/architectures/."
        )
    spec = builder(model)
    spec.validate(dict(model.named_parameters()), (name for name, _ in model.named_modules()))
    return spec


from hf_mudsc.architectures import bert, clip, vit  # noqa: E402,F401  (registration side effects)
