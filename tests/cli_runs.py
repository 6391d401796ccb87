"""Run the CLI in the test's own process: a refusal test needs its exit code and error lines, not a new interpreter
importing torch and transformers again (5-10 s a run; the CLI's import-time and Ctrl-C behaviour keep their
subprocess tests)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import pytest

# The CLI's log line format (cli.main.configure_logging), for the records a process of its own writes to stderr.
CLI_LOG_FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`hf-mudsc ARGV` as `hf_mudsc.cli.main.main` runs it: the exit code (argparse's usage errors exit 2 through
    SystemExit) and the non-blank lines written to stderr."""
    code, _, err = run_cli_output(argv, capsys)
    return code, [line for line in err.splitlines() if line.strip()]


def run_cli_output(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`hf-mudsc ARGV` in this process: the exit code, stdout and stderr. The loggers' levels, the progress-bar
    switches and the libraries' own bar settings the CLI sets for its run are put back after it (a process of its own
    would end with them), so later tests see none of them."""
    from hf_mudsc.cli.main import HTTP_LOGGERS, LIBRARY_BAR_SWITCHES, main

    loggers = [logging.getLogger(name) for name in ("", "hf_mudsc", *HTTP_LOGGERS)]
    levels = [logger.level for logger in loggers]
    switches = {name: os.environ.get(name) for name in LIBRARY_BAR_SWITCHES}
    capsys.readouterr()
    try:
        with library_bars_kept():
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


def run_cli_as_a_process(argv: Sequence[str], capsys: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture) -> tuple[int, str, str]:
    """`hf-mudsc ARGV` in this process, with stderr as a process of its own writes it: the lines printed there, then
    the log records at the levels the CLI sets, in its format. The root logger's level is the one
    `configure_logging`'s `logging.basicConfig` gives a fresh process (-vv: DEBUG, every library's lines); under
    pytest, whose handlers are already on the root, basicConfig would change nothing."""
    root = logging.getLogger()

    def basic_config(**kwargs: object) -> None:
        if "level" in kwargs:
            root.setLevel(kwargs["level"])  # put back by run_cli_output

    caplog.clear()
    real = logging.basicConfig
    logging.basicConfig = basic_config
    try:
        code, out, err = run_cli_output(argv, capsys)
    finally:
        logging.basicConfig = real
    logged = "".join(f"{CLI_LOG_FORMAT.format(record)}\n" for record in caplog.records)
    return code, out, err + logged


@contextlib.contextmanager
def library_bars_kept() -> Iterator[None]:
    """Put back huggingface_hub's, transformers' and datasets' own progress-bar settings (the CLI switches them off
    for its run) as they were, for the libraries already imported."""
    hub = sys.modules.get("huggingface_hub")
    transformers = sys.modules.get("transformers")
    datasets = sys.modules.get("datasets")
    hub_off = hub.utils.are_progress_bars_disabled() if hub else None
    transformers_on = transformers.utils.logging.is_progress_bar_enabled() if transformers else None
    datasets_on = datasets.is_progress_bar_enabled() if datasets else None
    try:
        yield
    finally:
        if hub is not None and not hub_off:
            hub.utils.enable_progress_bars()
        if transformers is not None and transformers_on:
            transformers.utils.logging.enable_progress_bar()
        if datasets is not None and datasets_on:
            datasets.enable_progress_bars()
