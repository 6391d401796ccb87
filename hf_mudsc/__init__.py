"""hf_mudsc: merge fine-tuned Hugging Face transformers without training (MuDSC, Xu et al., CVPR 2024)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_mudsc._version import __version__

if TYPE_CHECKING:
    from hf_mudsc.errors import MergeInputError, UnmergeableModelError
    from hf_mudsc.evaluate.decision import joint_predictions, joint_probabilities
    from hf_mudsc.evaluate.harness import evaluate_merge
    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.methods.registry import METHODS, MergeMethod, get_method, register_method
    from hf_mudsc.pipeline import MergeReport, from_pretrained, merge
    from hf_mudsc.publish.writer import push_merged, save_merged

# Every public name is exported lazily: the merge engine pulls in torch and transformers (5-8 s of import
# time) and evaluation also `datasets` and `evaluate`; `import hf_mudsc`, `hf-mudsc --help` and argument
# errors need none of them. Name -> the module that defines it.
_LAZY = {
    "EvaluationResult": "hf_mudsc.evaluate.results",
    "evaluate_merge": "hf_mudsc.evaluate.harness",
    "joint_probabilities": "hf_mudsc.evaluate.decision",
    "joint_predictions": "hf_mudsc.evaluate.decision",
    "from_pretrained": "hf_mudsc.pipeline",
    "merge": "hf_mudsc.pipeline",
    "MergeReport": "hf_mudsc.pipeline",
    "MergeInputError": "hf_mudsc.errors",
    "UnmergeableModelError": "hf_mudsc.errors",
    "METHODS": "hf_mudsc.methods.registry",
    "MergeMethod": "hf_mudsc.methods.registry",
    "get_method": "hf_mudsc.methods.registry",
    "register_method": "hf_mudsc.methods.registry",
    "save_merged": "hf_mudsc.publish.writer",
    "push_merged": "hf_mudsc.publish.writer",
}

__all__ = [
    "METHODS",
    "EvaluationResult",
    "MergeInputError",
    "MergeMethod",
    "MergeReport",
    "UnmergeableModelError",
    "__version__",
    "evaluate_merge",
    "from_pretrained",
    "get_method",
    "joint_predictions",
    "joint_probabilities",
    "merge",
    "push_merged",
    "register_method",
    "save_merged",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

