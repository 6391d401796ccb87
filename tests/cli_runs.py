"""Run the CLI in the test's own process: a refusal test needs its exit code and error lines, not a new interpreter
importing torch and transformers again (5-10 s a run; the CLI's import-time and Ctrl-C behaviour keep their
subprocess tests)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import pytest


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`hf-mudsc ARGV` as `hf_mudsc.cli.main.main` runs it: the exit code (argparse's usage errors exit 2 through
    SystemExit) and the non-blank lines written to stderr."""
    code, _, err = run_cli_output(argv, capsys)
    return code, [line for line in err.splitlines() if line.strip()]


def run_cli_output(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`hf-mudsc ARGV` in this process: the exit code, stdout and stderr. The loggers' levels and the progress-bar
    switches the CLI sets for its run are put back after it (a process of its own would end with them), so later
    tests see none of them."""
    from hf_mudsc.cli.main import HTTP_LOGGERS, LIBRARY_BAR_SWITCHES, main

    loggers = [logging.getLogger(name) for name in ("", "hf_mudsc", *HTTP_LOGGERS)]
    levels = [logger.level for logger in loggers]
    switches = {name: os.environ.get(name) for name in LIBRARY_BAR_SWITCHES}
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in switches.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    said = capsys.readouterr()
    return code, said.out, said.err
