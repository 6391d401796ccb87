"""`-q/--quiet`, `-v/--verbose` and progress: tqdm bars only on a terminal, periodic log lines otherwise.

The default run is a subprocess, whose stderr is a pipe (not a terminal): no bar may appear there (the libraries'
bars switched off by environment before they are imported), the periodic lines must. -q and -v run in this process
(`cli_runs.run_cli_as_a_process`: stderr as pytest captures it, not a terminal either, and the log records in the
CLI's format), sparing a merge in a new interpreter each. The HTTP client's per-request lines (default off, on with
-v) are checked against the Hub emulator in tests/test_dry_run.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from cli_runs import run_cli_as_a_process
from test_cli import save_parents_and_data

from hf_mudsc.cli.main import configure_logging
from hf_mudsc.progress import LOG_EVERY_SECONDS, Progress

FAST = ["--num-samples", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("verbosity_inputs"))


def run_merge(inputs, out, *flags: str, before: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    a, b, calibration = inputs
    argv = [sys.executable, "-m", "hf_mudsc", *before, "merge", str(a), str(b), "--calibration", str(calibration),
            "--output", str(out), *FAST, *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_default_shows_info_and_periodic_progress_lines_but_no_bars(inputs, tmp_path):
    proc = run_merge(inputs, tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err and "█" not in err and "it/s]" not in err  # no tqdm bar
    # 16 samples in batches of 4: a line at every batch (each passes a tenth of the total) ...
    lines = re.findall(r"^INFO hf_mudsc.progress: calibration: (\d+)/16 samples \((\d+)%\), [\d.]+ samples/s$",
                       err, re.M)
    assert lines == [("4", "25"), ("8", "50"), ("12", "75"), ("16", "100")]
    # ... and the solve's last line: the sweep limit cut to the sweeps run, so it ends at 100 %
    sweeps = re.findall(r"^INFO hf_mudsc.progress: solve: (\d+)/(\d+) sweeps \(100%\), objective=0\.\d+$", err, re.M)
    assert sweeps and all(done == total for done, total in sweeps)
    assert "INFO hf_mudsc.pipeline: merged" in err and "DEBUG" not in err


def merge_here(inputs, out, capsys, caplog, *before: str) -> tuple[int, str, str]:
    """`run_merge`'s command in this process: the exit code, stdout and stderr as a process of its own writes it."""
    a, b, calibration = inputs
    return run_cli_as_a_process([*before, "merge", str(a), str(b), "--calibration", str(calibration), "--output",
                                 str(out), *FAST], capsys, caplog)


def test_quiet_shows_no_info_and_no_progress(inputs, tmp_path, capsys, caplog):
    code, out, err = merge_here(inputs, tmp_path / "merged", capsys, caplog, "-q")
    assert code == 0, err[-3000:]
    assert "INFO" not in err and "calibration:" not in err and "\r" not in err
    assert "Merged model written to" in out  # the command's own result is still printed


def test_verbose_shows_debug_lines(inputs, tmp_path, capsys, caplog):
    code, _, err = merge_here(inputs, tmp_path / "merged", capsys, caplog, "-v")
    assert code == 0, err[-3000:]
    assert re.search(r"^DEBUG hf_mudsc.solve.loop: solve: sweep 1, objective 0\.\d+$", err, re.M)
    assert "INFO hf_mudsc.progress: calibration: 16/16 samples" in err


def test_quiet_and_verbose_together_are_refused(inputs, tmp_path):
    proc = run_merge(inputs, tmp_path / "merged", before=("-q", "-v"))
    assert proc.returncode == 2 and "-q/--quiet and -v/--verbose contradict each other" in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_configure_logging_levels():
    names = ("hf_mudsc", "httpx2", "huggingface_hub")
    try:
        configure_logging(0, False)
        assert [logging.getLogger(n).level for n in names] == [logging.INFO, logging.WARNING, logging.WARNING]
        configure_logging(0, True)
        assert [logging.getLogger(n).level for n in names] == [logging.WARNING, logging.WARNING, logging.WARNING]
        configure_logging(1, False)
        assert [logging.getLogger(n).level for n in names] == [logging.DEBUG, logging.INFO, logging.INFO]
    finally:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_every_tenth_and_every_30_seconds_when_not_a_terminal(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="hf_mudsc.progress"):
        with Progress(desc="calibration", unit="samples", total=100, rate=True, clock=clock) as bar:
            for _ in range(100):
                clock.now += 0.1
                bar.update(1)
        assert [r.getMessage() for r in caplog.records][:2] == [
            "calibration: 10/100 samples (10%), 10.0 samples/s", "calibration: 20/100 samples (20%), 10.0 samples/s"]
        assert len(caplog.records) == 10 and caplog.records[-1].getMessage().startswith("calibration: 100/100")
        caplog.clear()
        # Unknown total: a line every 30 s, and the last count when it closes.
        clock = FakeClock()
        with Progress(desc="calibration", unit="samples", clock=clock) as bar:
            for _ in range(7):
                clock.now += LOG_EVERY_SECONDS / 2
                bar.update(3)
        assert [r.getMessage() for r in caplog.records] == [
            "calibration: 6 samples", "calibration: 12 samples", "calibration: 18 samples", "calibration: 21 samples"]
        caplog.clear()
        # A limit that is not reached: the total is cut to what ran, so the last line reads 100 %.
        with Progress(desc="solve", unit="sweeps", total=100, clock=clock) as bar:
            for sweep in range(7):
                bar.update(1)
                bar.set_postfix(objective=f"{0.5 + sweep / 100:.5f}")
            bar.set_total(7)
        assert [r.getMessage() for r in caplog.records] == ["solve: 7/7 sweeps (100%), objective=0.56000"]
        caplog.clear()
        with Progress(desc="solve", unit="sweeps", total=10, enabled=False, clock=clock) as bar:
            bar.update(10)
        assert caplog.records == []


def test_fisher_and_evaluation_progress_are_log_lines_when_not_a_terminal(caplog, capsys):
    """Fisher's pass and the evaluation drew tqdm bars themselves: in a log file or a CI console (stderr not a
    terminal, as here under pytest's capture) a wall of carriage returns, and no progress line in the log. They use
    the stages' `Progress` like calibration: log lines, no bar."""
    import datasets
    from factories import make_batches, make_model
    from test_data import tokenizer

    import hf_mudsc
    from hf_mudsc.calibrate.fisher import diagonal_fisher
    from hf_mudsc.evaluate.harness import evaluate_merge

    model = make_model("bert_cls", seed=0, num_labels=3)
    batches = make_batches("bert_cls", num_batches=2, batch_size=5, seed=1)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        diagonal_fisher(model, lambda: batches, ["classifier.bias"], progress=True)
    fisher_lines = [r.getMessage() for r in caplog.records if r.name == "hf_mudsc.progress"]
    assert fisher_lines and fisher_lines[-1].startswith("fisher: 10 examples")
    assert "\r" not in capsys.readouterr().err

    caplog.clear()
    parents = [make_model("roberta_cls", seed=seed) for seed in (0, 1)]
    rows = [" ".join(f"w{i % 50}" for i in range(start, start + 8)) for start in range(6)]
    data = datasets.Dataset.from_dict({"text": rows, "label": [index % 3 for index in range(6)]})
    merged = hf_mudsc.merge(parents, data.remove_columns("label"), processor=tokenizer(), method="average",
                            progress=False)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        evaluate_merge(merged, parents, [data], processor=tokenizer(), batch_size=3, progress=True)
    evaluate_lines = [r.getMessage() for r in caplog.records if r.name == "hf_mudsc.progress"]
    assert evaluate_lines and evaluate_lines[-1].startswith("evaluate task_0: 2/2 batches (100%)")
    assert "\r" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_regmean_passes_report_progress(caplog, method):
    """regmean's own data pass (one per parent; regmean_plusplus one per parent and chained unit) showed nothing in the
    CLI — calibration, the solve, fisher, the refit and the evaluation each have a stage's progress; it now has one
    too (log lines here, stderr not being a terminal), ending at every pass done, and none with progress=False."""
    from factories import make_batches, make_model

    import hf_mudsc

    parents = [make_model("bert_cls", seed=seed, num_labels=3) for seed in (0, 1)]
    batches = make_batches("bert_cls", num_batches=2, batch_size=4, seed=1)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        hf_mudsc.merge(parents, batches, method=method, refit="none", progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_mudsc.progress" and r.getMessage().startswith(
        f"{method}: ")]
    assert lines, [r.getMessage() for r in caplog.records]
    done, _, total = lines[-1].split()[1].partition("/")
    assert done == total and int(total) >= 2 and "passes (100%)" in lines[-1], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        hf_mudsc.merge(parents, batches, method=method, refit="none", progress=False)
    assert not [r for r in caplog.records if r.name == "hf_mudsc.progress"]


@pytest.mark.parametrize(("argv", "quiet", "verbose"), [
    (["merge", "a", "b", "-q"], True, 0),  # QA s22: "unrecognized arguments: -q" after the command
    (["merge", "a", "b", "--verbose"], False, 1),
    (["-q", "merge", "a", "b"], True, 0),  # before the command, as before
    (["-v", "merge", "a", "b"], False, 1),
    (["merge", "a", "b"], False, 0),
])
def test_quiet_and_verbose_are_taken_before_or_after_the_command(argv, quiet, verbose):
    from hf_mudsc.cli.main import build_parser

    args = build_parser(available=["merge"]).parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_quiet_before_and_verbose_after_the_command_still_contradict(capsys):
    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main(["-q", "merge", "a", "b", "-v"])
    assert stopped.value.code == 2 and "contradict each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["inspect", "./nope/{token}"], ["push", "./nope/{token}", "me/x"]])
def test_verbose_tracebacks_hide_a_token_as_the_error_line_does(tmp_path, argv):
    """QA s23: with -v the debug traceback above the error line showed the token the error line hid ('***')."""
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
    command = [sys.executable, "-m", "hf_mudsc", "-v", *(part.format(token=token) for part in argv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode != 0 and "Traceback" in done.stderr, done.stderr[-2000:]
    assert token not in done.stderr and token not in done.stdout, done.stderr[-2000:]
    assert "***" in done.stderr.splitlines()[-1], done.stderr[-500:]
