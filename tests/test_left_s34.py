"""Defects left by earlier sessions and fixed in session 34: each reproduced here first."""

from __future__ import annotations

import logging

import pytest
from factories import make_batches
from test_avg_s33 import fine_tunes_of_one_base

import hf_mudsc

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_warnings_of_a_returned_average_name_plain_averaging_not_the_method_it_replaced(monkeypatch, caplog):
    """`merge(same_base_parents, data, alpha=0.3)`: auto chose regmean, which does not read α; when the averaging
    check then returned plain averaging the model (method linear) still said "method regmean does not read alpha=",
    naming a method that is not this model's. Now the returned merge's warnings are the average's ("method linear
    does not read alpha="), also logged, and no warning names the replaced method."""
    from hf_mudsc.apply import refit_gate

    parents, batches = fine_tunes_of_one_base(2), make_batches("vit_cls", num_batches=4, batch_size=8)
    kept = hf_mudsc.merge(parents, batches, alpha=0.3, progress=False)
    replaced = kept.config.mudsc["method"]
    assert any(f"method {replaced} does not read alpha=" in text for text in kept.config.mudsc["warnings"])
    monkeypatch.setattr(refit_gate.AverageCheck, "kept", property(lambda self: True))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, alpha=0.3, progress=False)
    returned = merged.config.mudsc["method"]
    assert returned != replaced
    warnings = merged.config.mudsc["warnings"]
    assert f"method {returned} does not read alpha= (CLI: --alpha): it has no effect" in warnings, warnings
    assert not any(f"method {replaced} " in text for text in warnings), warnings
    assert merged.merge_report.warnings == warnings
    assert any(f"method {returned} does not read alpha=" in record.getMessage() for record in caplog.records)
