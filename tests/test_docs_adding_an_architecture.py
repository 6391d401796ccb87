"""docs/adding_an_architecture.md is runnable: its adapter is the shipped one, and registered from the page it
merges a tiny random RoBERTa with a permuted copy of itself back to the original logits."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from factories import ARCHITECTURES, make_batches, make_model, model_output, permuted_copy, relative_error

import hf_mudsc
from hf_mudsc.architectures import roberta, spec_for
from hf_mudsc.architectures.registry import builder_for, register

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "adding_an_architecture.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_shows_the_shipped_adapter_verbatim():
    adapter, _ = python_blocks()
    assert adapter == Path(roberta.__file__).read_text(encoding="utf-8")


def test_the_page_shows_the_factory_rows_of_the_table():
    _, rows = python_blocks()
    assert rows in (ROOT / "tests" / "factories.py").read_text(encoding="utf-8")
    assert {"roberta_cls", "roberta"} <= set(ARCHITECTURES)


@pytest.fixture(scope="module")
def page_adapter():
    """The page's adapter, registered for `roberta` in place of the shipped one (restored afterwards)."""
    adapter, _ = python_blocks()
    module = types.ModuleType("page_roberta_adapter")
    try:
        exec(compile(adapter, str(PAGE), "exec"), module.__dict__)  # noqa: S102 (our own documentation)
        yield module
    finally:
        register("roberta")(roberta.roberta_spec)
    assert builder_for("roberta") is roberta.roberta_spec


@pytest.mark.parametrize("matcher", ["align", "zip"])
def test_the_page_adapter_recovers_a_permuted_copy(page_adapter, matcher):
    assert builder_for("roberta") is page_adapter.roberta_spec
    model = make_model("roberta_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches("roberta_cls", num_batches=3)
    expected = model_output(model, batches[0])
    assert relative_error(model_output(permuted, batches[0]), expected) < 1e-5
    moved = sum(not a.equal(b) for a, b in zip(model.parameters(), permuted.parameters()))
    assert moved > len(list(model.parameters())) // 2  # the copy really is in another basis
    merged = hf_mudsc.merge([model, permuted], batches, method="mudsc", matcher=matcher, progress=False)
    for batch in batches:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
