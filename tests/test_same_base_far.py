"""scripts/same_base_far.py: fine-tunes of one base trained far from it, built here (a tiny BERT, ~20 s on CPU).
Their weights are close ("shared base") but their units no longer correspond: the default merge must not fuse them by
position (regmean / linear lose a task), it must hand them to the unit matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_keeps_both_tasks_of_fine_tunes_whose_units_moved(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import same_base_far

    summary = same_base_far.main(["--seeds", "0", "--threads", "1"])
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(next(line for line in printed if line.startswith("{"))) == summary  # then the table
    assert summary["distance"][0] < 1.0  # "shared base" by the weights
    assert summary["units_in_place"][0] < 0.5
    parents, default = summary["parents"], summary["default"]
    assert min(parents.values()) > 0.95
    assert all(default[task] >= parents[task] - 0.05 for task in parents)  # both tasks kept
    assert summary["chosen"]["default"] == ["mudsc"] and default == summary["mudsc + gate"]
    assert min(summary["regmean + gate"].values()) < 0.7  # the position merge loses a task
    assert min(summary["linear + gate"].values()) < 0.7


def test_correspondence_shares_records_the_solve_and_the_papers_start(monkeypatch):
    """scripts/correspondence_shares.py's measurement on fine-tunes whose units stay: the check's solve leaves every
    unit in place; the record carries the paper's single start and every start's objective beside it."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import correspondence_shares
    from factories import fine_tune, make_batches, make_model

    parents = [fine_tune(make_model("vit_cls", seed=1), seed, 0.01, relative=True) for seed in (2, 3)]
    record = correspondence_shares.shares(parents, make_batches("vit_cls", num_batches=2))
    assert record["solve"]["units_in_place"] == 1.0 and 0.0 <= record["paper_start"]["units_in_place"] <= 1.0
    assert set(record["solve"]["starts"]) == {"activation", "weight", "identity"}
    assert list(record["paper_start"]["starts"]) == ["activation"] and record["distance"] < 1.0
