"""`errors.brief` and `errors.first_line`: how every message embeds another library's error in one short line."""

from __future__ import annotations

import pytest

from hf_mudsc.errors import brief, first_line


def test_brief_folds_whitespace_and_cuts() -> None:
    error = ValueError("line one\n  line\ttwo\n\nline three")
    assert brief(error) == "line one line two line three"
    long = ValueError("x" * 1000)
    assert brief(long) == "x" * 296 + " ..."
    assert len(brief(long)) == 300
    assert brief(long, limit=50) == "x" * 46 + " ..."
    assert brief(long, limit=None) == "x" * 1000


def test_first_line_keeps_the_first_non_empty_line() -> None:
    assert first_line(OSError("\n  first here  \nsecond\nthird")) == "first here"
    assert first_line(OSError("y" * 500), limit=20) == "y" * 16 + " ..."


@pytest.mark.parametrize("function", [brief, first_line])
def test_empty_message_names_the_error_type(function) -> None:
    assert function(KeyError()) == "KeyError"
    assert function(RuntimeError("   \n ")) == "RuntimeError"


def test_no_private_one_line_helpers_left() -> None:
    """One helper for one job: the modules call `errors.brief`/`first_line`, not their own copies."""
    import pathlib

    import hf_mudsc

    root = pathlib.Path(hf_mudsc.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py") if path.name != "errors.py"
                 and any(needle in path.read_text() for needle in ("def _one_line(", "def _brief(", "def _first_line(",
                                                                   "splitlines()[0]", "str(error).split())"))]
    assert offenders == []
