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


def test_the_memory_check_counts_every_process_a_launcher_starts_on_this_machine(monkeypatch):
    """`torchrun --nproc_per_node 4 -m hf_mudsc merge ...`: each process loads the parents and holds the summed
    statistics (process 0 alone solves), but each process's memory check held one process's floor against the
    machine's whole free memory: four processes passed a check that fit one and ran out of memory in calibration.
    Now the check counts the other processes on this machine (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate)
    and its one-line refusal names them and the fix."""
    from factories import make_model

    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.memory import local_processes
    from hf_mudsc.methods.registry import METHODS

    model, mudsc = make_model("bert_cls", 1), METHODS["mudsc"]
    floor = plan.memory_floor(model, 2, mudsc, loading=2)
    one = sum(floor.values())
    shared = floor["weights"] + floor["statistics"]  # what a process that does not solve holds too
    monkeypatch.setattr(plan, "available_memory", lambda: int(one * 1.01))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_processes() == 1
    plan.check_memory(model, 2, mudsc, loading=2)  # one process: fits
    for value in ("", "x", "0", "-3"):  # not a launcher's count: one process
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
        assert local_processes() == 1
        plan.check_memory(model, 2, mudsc, loading=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_processes() == 4
    with pytest.raises(MergeInputError) as error:
        plan.check_memory(model, 2, mudsc, loading=2)
    line = str(error.value)
    assert "\n" not in line and "the 3 other processes on this machine" in line, line
    assert "launch fewer processes per machine (--nproc_per_node)" in line, line
    assert plan.memory_shortfall(model, 2, mudsc, loading=2) == (one + 3 * shared, int(one * 1.01))
    monkeypatch.setattr(plan, "available_memory", lambda: int((one + 3 * shared) * 1.01))
    plan.check_memory(model, 2, mudsc, loading=2)  # room for all four: fits
    assert plan.memory_shortfall(model, 2, mudsc, loading=2) is None
