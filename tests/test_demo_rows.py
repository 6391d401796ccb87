"""`hf-mudsc demo` explains every row of its table in one line (issue 12: the default against every baseline)."""

from __future__ import annotations

from hf_mudsc.cli.demo import PAPER_LABEL, REFIT_SUFFIX, demo_methods, row_note


def test_every_demo_row_has_a_one_line_explanation():
    runs = [*demo_methods(), (PAPER_LABEL, {"method": "mudsc", "matcher": "zip", "refit": "none"})]
    labels = [label + (REFIT_SUFFIX if index < 2 else "") for index, (label, _) in enumerate(runs)]
    notes = {name: row_note(name, runs, labels) for name in ["parent_a", "parent_b", "ensemble", *labels]}
    assert all(note and "\n" not in note and len(note) <= 140 for note in notes.values()), notes
    assert notes["mudsc (zip) + refit"].endswith(", then the refit")
    assert notes["zipit"] == "Activation correlation only, zip matcher"
    assert notes["activation_align"] == "Activation correlation only, align matcher"
    assert notes["average"] == "Plain parameter average"
    assert notes[PAPER_LABEL].startswith("the paper's merge")
