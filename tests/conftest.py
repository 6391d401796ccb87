"""Every test runs offline with a throwaway Hugging Face cache (the Hub emulator tests use subprocesses)."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_mudsc_test_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from hub_emulator import hub_emulator, hub_emulator_session  # noqa: E402,F401  (fixtures for the Hub tests)
