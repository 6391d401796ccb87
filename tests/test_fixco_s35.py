"""Session 35's card/options reviewer's findings: line breaks a reader needs kept, recipes told from other JSON files,
hints that blamed the wrong thing, one wording for duplicate keys, distinct chart names."""

from __future__ import annotations

import io
import logging

from hf_mudsc.load.references import EscapedControls


class Pipe:
    """A worker's end of the pipe as the scheduler reads it: the messages given, then closed."""

    def __init__(self, incoming: list[tuple]) -> None:
        self.incoming = list(incoming)

    def recv(self) -> tuple:
        if self.incoming:
            return self.incoming.pop(0)
        raise EOFError


def test_the_service_logs_a_failed_jobs_traceback_on_several_lines_with_its_controls_escaped(tmp_path):
    """`hf-mudsc serve`, a job failing: its log showed "job X failed:\\nTraceback...\\n  File" on one line."""
    from hf_mudsc.serve.scheduler import Running, Scheduler
    from hf_mudsc.serve.store import JobStore

    trace = ("Traceback (most recent call last):\n  File \"/srv/x.py\", line 3, in run\n    go()\n"
             "RuntimeError: label 'cat\x1b[2J\u202e'")
    store = JobStore(tmp_path / "state")
    job_id = store.add({"models": ["a/b", "c/d"]}, output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(job_id, status="running")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapedControls())  # as `configure_logging` gives the service's stderr handler
    logger = logging.getLogger("hf_mudsc.serve.scheduler")
    logger.addHandler(handler)
    try:
        Scheduler(store)._copy_messages(job_id, Running(process=None, conn=Pipe([("traceback", logging.ERROR, trace)])))
    finally:
        logger.removeHandler(handler)
        store.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"job {job_id} failed:" and lines[1] == "Traceback (most recent call last):", lines
    assert lines[-1] == "RuntimeError: label 'cat\\x1b[2J\\u202e'", lines


def test_an_hf_mudsc_record_without_keep_lines_stays_one_line():
    """A label "cat\\nERROR forged" in an hf_mudsc log line must still not forge a line of its own."""
    record = logging.LogRecord("hf_mudsc.x", logging.INFO, __file__, 1, "label %s", ("cat\nERROR forged",), None)
    EscapedControls().filter(record)
    assert record.getMessage() == "label cat\\nERROR forged"


def test_an_adapters_list_of_spec_problems_prints_as_a_list_and_a_name_with_a_line_break_stays_escaped(
        monkeypatch, capsys):
    """`hf-mudsc merge`, an adapter spec misfitting: "does not fit the model:\\n  - group ..." printed on one line."""
    from hf_mudsc.cli import inspect as inspect_command
    from hf_mudsc.cli.main import main
    from hf_mudsc.errors import SpecError

    forged = "x.\nERROR forged"  # a parameter name, repr'd by the spec as every name is
    problems = ("group 'mlp': no parameter 'fc1.weight'", f"parameter {forged!r} is in no group")

    def refuse(args: object) -> int:
        raise SpecError("the vit permutation spec does not fit the model:\n  - " + "\n  - ".join(problems),
                        problems=problems)

    monkeypatch.setattr(inspect_command, "run", refuse)
    assert main(["inspect", "some-folder"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["hf-mudsc inspect: error: the vit permutation spec does not fit the model:",
                     "  - group 'mlp': no parameter 'fc1.weight'",
                     "  - parameter 'x.\\nERROR forged' is in no group"], lines


def test_an_error_naming_a_value_with_a_line_break_unquoted_stays_one_line(monkeypatch, capsys):
    """`hf-mudsc inspect` failing on a label "cat\\nERROR forged" named in its message must not forge a line."""
    from hf_mudsc.cli import inspect as inspect_command
    from hf_mudsc.cli.main import main

    def refuse(args: object) -> int:
        raise ValueError("label cat\nERROR forged is unknown")

    monkeypatch.setattr(inspect_command, "run", refuse)
    assert main(["inspect", "some-folder"]) == 1
    assert capsys.readouterr().err.splitlines() == ["hf-mudsc inspect: error: label cat\\nERROR forged is unknown"]
