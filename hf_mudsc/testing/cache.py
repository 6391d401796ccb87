"""Where the demo and the benchmark scripts keep what they train between runs (`$HF_MUDSC_CACHE`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HF_MUDSC_CACHE"


def cache_root() -> Path:
    """`$HF_MUDSC_CACHE`, or `~/.cache/hf_mudsc` when it is unset or empty: an empty variable means unset (as HF_HOME
    is read), where a path built from "" would put the cache in whatever folder the command runs in."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_mudsc")
