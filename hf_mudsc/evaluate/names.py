"""Names of the evaluation's views, scorers and files, kept free of heavy imports.

The CLI's `evaluate --help` shows some of them; importing the evaluation stack (torch, datasets, evaluate:
seconds) just for these strings would make help slow.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_mudsc.errors import EvaluationError

JOINT = "joint"
#: How a concatenated head (merged model or ensemble) decides the joint test: `per_task` — each task's softmax
#: over its own slice, then the argmax (the default); `raw` — the argmax over the raw concatenated logits (what a
#: `transformers` pipeline does with a merged model). Both models are always scored by the same rule.
JOINT_RULES = ("per_task", "raw")
AVERAGE = "average"
PARENT_NAMES = ("parent_a", "parent_b")


def parent_letter(index: int) -> str:
    """How messages and tables name parent `index` (0 -> "A", 1 -> "B", ...; past "Z": "P26", ...)."""
    return chr(ord("A") + index) if index < 26 else f"P{index}"


def parent_names(count: int) -> list[str]:
    """The scorer names of `count` parents in merge order: `parent_a`, `parent_b`, `parent_c`, ..."""
    return [f"parent_{parent_letter(i).lower()}" for i in range(count)]
ENSEMBLE = "ensemble"
MERGED = "merged"
LABEL_COLUMNS = ("label", "labels")
DEFAULT_PROMPT = "a photo of a {}."
RESULTS_FILENAME = "eval_results.json"
SHIPPED_METRIC_NAMES = ("accuracy", "f1")  # the keys of metrics.SHIPPED_METRICS (a test keeps them equal)
#: How a shipped metric averages, as the card's table (`f1 (macro)`) and `model-index` (`args`) say it: `f1` alone
#: could be read as micro-F1, which for one label per row is the accuracy.
SHIPPED_METRIC_ARGS = {"f1": {"average": "macro"}}


def check_metric_names(names: Sequence[str]) -> None:
    """At least one metric, each once: a metric named twice would put every figure twice on the card (its table and
    `model-index`), none would give a result without figures. Here, not in `metrics`, so the CLI checks its flags
    before the evaluation stack is imported."""
    if not names:
        raise EvaluationError(f"no metric to compute: pass at least one (shipped: {', '.join(SHIPPED_METRIC_NAMES)})")
    twice = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if twice is not None:
        raise EvaluationError(f"metric {twice!r} is given twice; name each metric once")
