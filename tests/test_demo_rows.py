"""`hf-mudsc demo` explains every row of its table in one line (issue 12: the default against every baseline)."""

from __future__ import annotations

import re
from pathlib import Path

from hf_mudsc.cli.demo import PAPER_LABEL, REFIT_NOTE, REFIT_SUFFIX, demo_methods, row_note


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


def test_the_refit_note_points_at_pages_that_exist():
    """The demo explains why a position merge + refit can lead on its toy pair by a measured page; the pages it names
    must be in the repository (a renamed page would leave the user a dead reference)."""
    root = Path(__file__).resolve().parents[1]
    pages = re.findall(r"docs/[\w/.]+\.md", REFIT_NOTE)
    assert "docs/benchmarks/matching_after_refit.md" in pages
    assert all((root / page).is_file() for page in pages), pages
