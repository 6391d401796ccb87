"""The package's public names: everything in `__all__` is importable, and `import hf_mudsc` stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hf_mudsc


def test_every_public_name_is_exported():
    for name in hf_mudsc.__all__:
        assert getattr(hf_mudsc, name) is not None, name
    assert {"evaluate_merge", "EvaluationResult", "merge", "from_pretrained"} <= set(hf_mudsc.__all__)
    assert {"evaluate_merge", "EvaluationResult"} <= set(dir(hf_mudsc))


def test_evaluation_is_exported_from_the_package():
    from hf_mudsc import EvaluationResult, evaluate_merge
    from hf_mudsc.evaluate import harness as evaluation

    assert evaluate_merge is evaluation.evaluate_merge and EvaluationResult is evaluation.EvaluationResult
    result = EvaluationResult(metrics=["accuracy"], tasks={"t": {}}, scores={"merged": {"t": {"accuracy": 0.5}}})
    assert result.score("merged", "t") == 0.5


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        hf_mudsc.not_a_name  # noqa: B018
    with pytest.raises(ImportError):
        from hf_mudsc import not_a_name  # noqa: F401


def test_importing_the_package_does_not_load_the_evaluation_stack():
    """`datasets` and `evaluate` (over a second of import time) load only when evaluation is used."""
    code = (
        "import sys, hf_mudsc\n"
        "heavy = [m for m in ('evaluate', 'datasets', 'hf_mudsc.evaluate.harness') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from hf_mudsc import evaluate_merge\n"
        "assert 'hf_mudsc.evaluate.harness' in sys.modules\n"
        "assert evaluate_merge.__module__ == 'hf_mudsc.evaluate.harness'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


HEAVY = ("torch", "transformers", "datasets", "evaluate")


def _run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_package_does_not_load_torch():
    out = _run_python(
        "import sys, hf_mudsc\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_lazy_exports_still_work_and_merge_is_the_function():
    """`hf_mudsc.merge` is the function (the pipeline lives in `hf_mudsc.pipeline`; no submodule shadows it)."""
    out = _run_python(
        "import hf_mudsc\n"
        "import hf_mudsc.pipeline\n"
        "from hf_mudsc import MergeInputError, MergeReport, METHODS, from_pretrained, merge\n"
        "import inspect, sys\n"
        "print(inspect.isfunction(hf_mudsc.merge), merge is hf_mudsc.merge, merge.__module__)\n"
        "print(issubclass(MergeInputError, ValueError), MergeReport.__module__, 'mudsc' in METHODS)\n"
        "print(from_pretrained.__module__, 'torch' in sys.modules)\n"
    )
    assert out.split("\n")[:3] == ["True True hf_mudsc.pipeline", "True hf_mudsc.pipeline True",
                                   "hf_mudsc.pipeline True"]
