"""Every test runs offline with a throwaway Hugging Face cache (the Hub emulator tests use subprocesses)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

THROWAWAY_HOME = "hf_mudsc_test_home_"

os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (the README's `-n 2`) each worker takes its own throwaway cache: the one the controller made
# reaches the workers through the environment, and two workers filling one cache would see each other's files.
if os.environ.get("PYTEST_XDIST_WORKER") and Path(os.environ.get("HF_HOME", "")).name.startswith(THROWAWAY_HOME):
    del os.environ["HF_HOME"]
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix=THROWAWAY_HOME))
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


@pytest.fixture()
def local_hub(hub_emulator, monkeypatch):  # noqa: F811  (the fixture imported above)
    """The emulator as this process's Hub: the CLI or the API run in-process against it (no interpreter start-up,
    no second import of torch per run; a subprocess is kept where the environment itself is under test)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_emulator.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # downloads: read at call time, not ENDPOINT
                        hub_emulator.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # what transformers and datasets read at call time
    monkeypatch.setenv("HF_ENDPOINT", hub_emulator.endpoint)
    return hub_emulator
