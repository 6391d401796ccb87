"""Every test runs offline with a throwaway Hugging Face cache; the Hub emulator tests run the client in this process
(`local_hub`, `hub_cli`), or in a subprocess where the process itself is under test."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

THROWAWAY_HOME = "hf_mudsc_test_home_"

os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (the README's `-n 2`) each worker takes its own throwaway cache: the one the controller made
# reaches the workers through the environment, and two workers filling one cache would see each other's files.
if os.environ.get("PYTEST_XDIST_WORKER") and Path(os.environ.get("HF_HOME", "")).name.startswith(THROWAWAY_HOME):
    del os.environ["HF_HOME"]
if "HF_HOME" not in os.environ:
    # Removed when this process ends (the controller's and each worker's own): a run must not leave caches behind.
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix=THROWAWAY_HOME)
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite's models are tiny: one thread avoids OpenMP synchronisation that dominates small ops (and that
# degrades badly when the 2 cores are shared); subprocesses (CLI tests) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402
from hub_emulator import hub_emulator, hub_emulator_session  # noqa: E402,F401  (fixtures for the Hub tests)


@pytest.fixture
def one_thread():
    """One torch thread for the test, whatever an earlier test left set (merges compared bit for bit, or timed):
    modules ask for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module, its module-scoped fixtures' merges included (tiny tensors: on a busy 2-core
    machine a second intra-op thread only adds contention); modules ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digit_pair_cache(tmp_path_factory) -> Path:
    """One cache of trained toy digit ViTs for the whole run, shared by the xdist workers (the toy cache writes each
    model atomically, so two workers training the same pair at once is safe): a pair several files train with the
    same settings is trained once. Not for tests of the training or the cache themselves (tests/test_toy.py)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    return root / "shared-digit-pairs"


@pytest.fixture()
def local_hub(hub_emulator, monkeypatch):  # noqa: F811  (the fixture imported above)
    """The emulator as this process's Hub: the CLI or the API run in-process against it (no interpreter start-up,
    no second import of torch per run; a subprocess is kept where the environment itself is under test)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_emulator.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_emulator.default_hf_home / "hub"))  # fresh, as a client's
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # downloads: read at call time, not ENDPOINT
                        hub_emulator.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # what transformers and datasets read at call time
    monkeypatch.setenv("HF_ENDPOINT", hub_emulator.endpoint)
    return hub_emulator


@dataclass
class CliRun:
    """A CLI run in the test's process: its exit code, stdout, and what a process of its own would have written to
    stderr (the error lines, then the log lines at the CLI's levels, in its format)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def hub_cli(local_hub, monkeypatch, capsys, caplog):
    """`hf-mudsc ARGV` run in this process against the emulator (no interpreter start-up, no second torch import per
    run), with `token` in HF_TOKEN as a client's environment has it (None: no token) and `extra` environment
    variables for that run (TMPDIR also as tempfile's folder, which a process reads once)."""
    from cli_runs import run_cli_as_a_process

    def run(*argv: str, token: str | None = local_hub.token, extra: dict[str, str] | None = None) -> CliRun:
        with monkeypatch.context() as patch:
            if token is None:
                patch.delenv("HF_TOKEN", raising=False)
            else:
                patch.setenv("HF_TOKEN", token)
            for name, value in (extra or {}).items():
                patch.setenv(name, value)
            if extra and "TMPDIR" in extra:
                patch.setattr(tempfile, "tempdir", extra["TMPDIR"])
            return CliRun(*run_cli_as_a_process(argv, capsys, caplog))

    return run


def _interrupt_state() -> tuple[object, frozenset[signal.Signals]]:
    """SIGINT's handler and this thread's blocked signals: what a subprocess inherits through exec (an ignored or
    blocked SIGINT makes it deaf to Ctrl-C)."""
    return signal.getsignal(signal.SIGINT), frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, []))


_INTERRUPT_AT_START = _interrupt_state()


@pytest.fixture(autouse=True)
def interrupt_unchanged():
    """Fail a test that leaves SIGINT's handler or the signal mask changed (and put them back): the Ctrl-C test's
    merge, in the same xdist worker, inherited SIG_IGN from an earlier test and never stopped (CI's 60 s timeout)."""
    handler, blocked = _interrupt_state()
    if (handler, blocked) != _INTERRUPT_AT_START:  # a module or session fixture changed it (and the tests under it)
        signal.signal(signal.SIGINT, _INTERRUPT_AT_START[0])
        signal.pthread_sigmask(signal.SIG_SETMASK, _INTERRUPT_AT_START[1])
        pytest.fail(f"the process's signal state changed before this test (by a module or session fixture): SIGINT's "
                    f"handler {handler!r}, blocked signals {sorted(blocked)}; at the session's start "
                    f"{_INTERRUPT_AT_START[0]!r}, {sorted(_INTERRUPT_AT_START[1])}", pytrace=False)
    yield
    after_handler, after_blocked = _interrupt_state()
    changes = []
    if after_handler != handler:
        changes.append(f"SIGINT's handler went from {handler!r} to {after_handler!r}")
        signal.signal(signal.SIGINT, handler)
    if after_blocked != blocked:
        changes.append(f"the blocked signals went from {sorted(blocked)} to {sorted(after_blocked)}")
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if changes:
        pytest.fail("this test left the process's signal state changed (put it back in the test or its fixture): "
                    + "; ".join(changes), pytrace=False)
