"""hf_mudsc: merge fine-tuned Hugging Face transformers without training (MuDSC, Xu et al., CVPR 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .loading import from_pretrained  # noqa: E402
from .merge import MergeInputError, MergeReport, merge  # noqa: E402
from .methods import METHODS, MergeMethod, get_method, register_method  # noqa: E402

if TYPE_CHECKING:
    from .evaluation import EvaluationResult, evaluate_merge
    from .publish import push_merged, save_merged

# Exported lazily: `hf_mudsc.evaluation` pulls in `datasets` and `evaluate` (over a second of import time),
# which a merge does not need; `hf_mudsc.publish` pulls in the card renderer and the Hub client.
_LAZY = {"EvaluationResult": "evaluation", "evaluate_merge": "evaluation", "save_merged": "publish",
         "push_merged": "publish"}

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
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
