"""The Space's entry point: `hf-mudsc serve` on the port a Space exposes (7860).

The Space is reachable from outside, so the service binds 0.0.0.0 and needs an API key: it reads the Space secret
`HF_MUDSC_API_KEY` from the environment (never from the command line, where other processes could see it). The
job store goes to persistent storage (`/data`) when the Space has it, else to the home folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def serve_args(env: Mapping[str, str] = os.environ, data: Path = Path("/data")) -> list[str]:
    """The `hf-mudsc` arguments this Space runs (PORT, HF_MUDSC_STATE_DIR, HF_MUDSC_WORKERS may override)."""
    state = data / "hf-mudsc" if data.is_dir() else Path.home() / "hf-mudsc-state"
    return ["serve", "--host", "0.0.0.0", "--port", env.get("PORT", "7860"),
            "--state-dir", env.get("HF_MUDSC_STATE_DIR", str(state)), "--workers", env.get("HF_MUDSC_WORKERS", "1")]


if __name__ == "__main__":
    from hf_mudsc.cli.main import main

    sys.exit(main(serve_args()))
