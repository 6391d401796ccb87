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

__all__ = [
    "METHODS",
    "MergeMethod",
    "MethodContext",
    "MethodResult",
    "get_method",
    "method_runs",
    "register_method",
    "unregister_method",
]
