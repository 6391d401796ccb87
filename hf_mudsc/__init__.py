"""hf_mudsc: merge fine-tuned Hugging Face transformers without training (MuDSC, Xu et al., CVPR 2024)."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .evaluation import EvaluationResult, evaluate_merge
    from .loading import from_pretrained
    from .merge import MergeInputError, MergeReport, merge
    from .methods import METHODS, MergeMethod, get_method, register_method
    from .publish import push_merged, save_merged

# Every public name is exported lazily: the merge engine pulls in torch and transformers (5-8 s of import
# time) and `hf_mudsc.evaluation` also `datasets` and `evaluate`; `import hf_mudsc`, `hf-mudsc --help` and
# argument errors need none of them.
_LAZY = {
    "EvaluationResult": "evaluation",
    "evaluate_merge": "evaluation",
    "from_pretrained": "loading",
    "MergeInputError": "merge",
    "MergeReport": "merge",
    "merge": "merge",
    "METHODS": "methods",
    "MergeMethod": "methods",
    "get_method": "methods",
    "register_method": "methods",
    "save_merged": "publish",
    "push_merged": "publish",
}

__all__ = [
    "METHODS",
    "EvaluationResult",
    "MergeInputError",
    "MergeMethod",
    "MergeReport",
    "__version__",
    "evaluate_merge",
    "from_pretrained",
    "get_method",
    "merge",
    "push_merged",
    "register_method",
    "save_merged",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `hf_mudsc.merge` the function: importing the submodule `hf_mudsc.merge` makes Python set the
    package attribute of that name to the module, which would shadow the lazily exported function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "merge" and isinstance(value, types.ModuleType):
            value = value.merge
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
