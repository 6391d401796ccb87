"""Parents given as model objects, held as the merge needs them and given back exactly as they were.

A merge runs the caller's own objects (calibration, the refit, the α search and the refit gate's scores) and copies
parent A into the merged model. While it does, every module is in eval mode (dropout off: the statistics and the
scores are the parents' function as their weights define it, whatever mode the caller left them in) and holds none
of the caller's hooks (a hook would run on the merge's batches, could change the statistics, and `copy.deepcopy`
would carry it into the merged model). On return or failure, Ctrl-C included, each module gets its own mode and its
own hook dictionaries back (the same objects: the caller's handles still remove their hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

# The per-module hook registries of `torch.nn.Module` (forward, backward, state-dict ones), read from a bare
# module so that a registry a later torch adds is held too.
HOOK_REGISTRIES = tuple(name for name, value in vars(nn.Module()).items() if "hook" in name and isinstance(value, dict))


def model_objects(given: Iterable[Any]) -> list[nn.Module]:
    """The modules among merge inputs: a model object itself, a `LoadedParent`'s model; references (str, paths) and
    None are skipped."""
    found = []
    for item in given:
        model = item if isinstance(item, nn.Module) else getattr(item, "model", None)
        if isinstance(model, nn.Module):
            found.append(model)
    return found


@contextlib.contextmanager
def held_as_given(models: Iterable[nn.Module]) -> Iterator[None]:
    """Every module of `models` in eval mode and without hooks inside the block; each module's mode and hook
    registries restored on leaving it (module docstring). Nested uses and shared modules are fine."""
    saved: dict[int, tuple[nn.Module, bool, dict[str, dict]]] = {}
    for model in models:
        for module in model.modules():
            if id(module) not in saved:
                saved[id(module)] = (module, module.training,
                                     {name: getattr(module, name) for name in HOOK_REGISTRIES})
    try:
        for module, _, registries in saved.values():
            module.training = False
            for name, registry in registries.items():
                setattr(module, name, type(registry)())
        yield
    finally:
        for module, training, registries in saved.values():
            module.training = training
            for name, registry in registries.items():
                setattr(module, name, registry)
