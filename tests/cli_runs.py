"""Run the CLI in the test's own process: a refusal test needs its exit code and error lines, not a new interpreter
importing torch and transformers again (5-10 s a run; the CLI's import-time and Ctrl-C behaviour keep their
subprocess tests)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`hf-mudsc ARGV` as `hf_mudsc.cli.main.main` runs it: the exit code (argparse's usage errors exit 2 through
    SystemExit) and the non-blank lines written to stderr."""
    from hf_mudsc.cli.main import main

    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
