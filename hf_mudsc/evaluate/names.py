"""Names of the evaluation's views, scorers and files, kept free of heavy imports.

The CLI's `evaluate --help` shows some of them; importing the evaluation stack (torch, datasets, evaluate:
seconds) just for these strings would make help slow.
"""

from __future__ import annotations

JOINT = "joint"
AVERAGE = "average"
PARENT_NAMES = ("parent_a", "parent_b")
ENSEMBLE = "ensemble"
MERGED = "merged"
LABEL_COLUMNS = ("label", "labels")
DEFAULT_PROMPT = "a photo of a {}."
RESULTS_FILENAME = "eval_results.json"
SHIPPED_METRIC_NAMES = ("accuracy", "f1")  # the keys of metrics.SHIPPED_METRICS (a test keeps them equal)
