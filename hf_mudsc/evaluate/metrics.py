"""The metrics: `evaluate.Metric` subclasses shipped here (`accuracy`, `f1`: macro F1), so nothing is downloaded
or run. Other names go through `evaluate.load`, which runs the metric's script — only with
`trust_remote_code=True`. `evaluate.evaluator` is not used (it breaks on transformers 5).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

from hf_mudsc.errors import EvaluationError

logger = logging.getLogger(__name__)

_CLASS_FEATURES = datasets.Features(
    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
)


class Accuracy(evaluate.Metric):
    """Top-1 accuracy: the fraction of predictions equal to their reference (same as the Hub's `accuracy`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions that equal the reference label.",
            citation="",
            inputs_description="predictions, references: integer class ids; optional sample_weight.",
            features=_CLASS_FEATURES,
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int],
                 sample_weight: Sequence[float] | None = None) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise EvaluationError("accuracy of zero samples is undefined; the evaluation data is empty")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean())}
        weights = np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}


class F1(evaluate.Metric):
    """Macro F1: the unweighted mean over classes of 2·precision·recall/(precision+recall).

    Classes that occur in neither predictions nor references are left out (as scikit-learn does); a class
    that occurs in only one of them counts with F1 = 0.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Macro-averaged F1 over the classes present in predictions or references.",
            citation="",
            inputs_description="predictions, references: integer class ids.",
            features=_CLASS_FEATURES,
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise EvaluationError("F1 of zero samples is undefined; the evaluation data is empty")
        scores = []
        for label in np.union1d(predictions, references):
            tp = float(np.sum((predictions == label) & (references == label)))
            fp = float(np.sum((predictions == label) & (references != label)))
            fn = float(np.sum((predictions != label) & (references == label)))
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return {"f1": float(np.mean(scores))}


SHIPPED_METRICS: dict[str, type[evaluate.Metric]] = {"accuracy": Accuracy, "f1": F1}


def load_metric(name: str, *, trust_remote_code: bool = False) -> evaluate.EvaluationModule:
    """A shipped metric by name (offline); any other name, folder or Space only with `trust_remote_code=True`.

    `evaluate.load` imports the metric's Python script, so running code that is not ours is an explicit choice.
    """
    if name in SHIPPED_METRICS:
        return SHIPPED_METRICS[name](keep_in_memory=True)
    if not trust_remote_code:
        raise EvaluationError(
            f"metric {name!r} is not shipped with hf_mudsc (shipped: {', '.join(SHIPPED_METRICS)}); loading it "
            "runs its Python script: pass trust_remote_code=True (CLI: --trust-remote-code) if you trust that code"
        )
    logger.warning("trust_remote_code=True: evaluate.load runs the code of metric %r", name)
    try:
        return evaluate.load(name)
    except Exception as error:  # evaluate raises many types (ConnectionError, FileNotFoundError, ...)
        raise EvaluationError(
            f"metric {name!r} is not shipped with hf_mudsc (shipped: {', '.join(SHIPPED_METRICS)}) and "
            f"evaluate.load({name!r}) failed ({type(error).__name__}: {error}); a Hub metric needs the Hub — "
            "go online or use a shipped metric"
        ) from error


def compute_metric(name: str, predictions: Sequence[int], references: Sequence[int], *,
                   trust_remote_code: bool = False, module: evaluate.EvaluationModule | None = None,
                   view: str | None = None) -> float:
    """One finite number: the metric's value (the key named like the metric, else the only key).

    `module`: the metric already loaded (`load_metric`), so a metric script is imported once, not per view.
    `view`: what was scored (for the error). A value that is no finite number (NaN, inf, None, a string, a list) is
    refused: it would be published as a score in the results file and the card's `model-index`.
    """
    if module is None:
        module = load_metric(name, trust_remote_code=trust_remote_code)
    values = module.compute(predictions=list(map(int, predictions)), references=list(map(int, references)))
    if name in values:
        return finite_score(name, values[name], view)
    if len(values) == 1:
        return finite_score(name, next(iter(values.values())), view)
    raise EvaluationError(f"metric {name!r} returned several values {sorted(values)}; pass a metric with one")


def finite_score(name: str, value: Any, view: str | None = None) -> float:
    """`value` as a float when it is a finite real number, else a one-line `EvaluationError` naming the metric."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    where = f" on {view!r}" if view else ""
    said = " ".join(repr(value).split())
    said = said if len(said) <= 60 else f"{said[:57]}..."
    raise EvaluationError(f"metric {name!r} returned {said}{where}, which is not a finite number, so it cannot be "
                          "written as a score; fix the metric (or the data it cannot score) or drop it")
