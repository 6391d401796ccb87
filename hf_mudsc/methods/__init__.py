"""Merge methods: the registry plus one module per method family, registered when this package is imported.

The import order is the registry order (the `--method` choices, the card and the demo list follow it).
"""

from hf_mudsc.methods import matching as matching  # noqa: I001 — registers mudsc, zipit, activation_align, weight_matching
from hf_mudsc.methods import average as average  # registers average
from hf_mudsc.methods import task_vector as task_vector  # linear, ties, dare_*, ... layer_swap
from hf_mudsc.methods import data as data  # registers regmean, regmean_plusplus, fisher
from hf_mudsc.methods.registry import (
    METHODS,
    MergeMethod,
    MethodContext,
    MethodResult,
    get_method,
    method_runs,
    register_method,
    unregister_method,
)

#: The methods hf_mudsc ships (registered by the imports above): any other is a plug-in (`register_method`), which
#: `hf-mudsc merge --recipe` cannot import: its recipe re-runs from Python (`plugin_module`).
BUILT_IN_METHODS = frozenset(METHODS)


def plugin_module(name: str) -> str | None:
    """For a method that is not built in (`BUILT_IN_METHODS`), the module to import before re-running its recipe from
    Python: its class's module (`type(method).__module__`) when that is neither hf_mudsc's own (a plug-in may register
    an instance of a shipped class) nor a script's (`__main__`), else "" (not known). None for a built-in method and
    for `auto`, which picks a registered one."""
    if name in BUILT_IN_METHODS or name == "auto":
        return None
    method = METHODS.get(name)
    module = type(method).__module__ if method is not None else ""
    return "" if module == "__main__" or module.split(".")[0] == "hf_mudsc" else module


__all__ = [
    "BUILT_IN_METHODS",
    "METHODS",
    "MergeMethod",
    "MethodContext",
    "MethodResult",
    "get_method",
    "method_runs",
    "plugin_module",
    "register_method",
    "unregister_method",
]
