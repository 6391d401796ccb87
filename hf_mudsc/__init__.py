"""hf_mudsc: merge fine-tuned Hugging Face transformers without training (MuDSC, Xu et al., CVPR 2024)."""

from __future__ import annotations

__version__ = "0.1.0"

from .loading import from_pretrained  # noqa: E402
from .merge import MergeInputError, MergeReport, merge  # noqa: E402
from .methods import METHODS, MergeMethod, get_method, register_method  # noqa: E402

__all__ = [
    "METHODS",
    "MergeInputError",
    "MergeMethod",
    "MergeReport",
    "__version__",
    "from_pretrained",
    "get_method",
    "merge",
    "register_method",
]
