"""Argument types the commands share."""

from __future__ import annotations

import argparse


def path_text(text: str) -> str:
    """A path argument that names something: `hf-mudsc push "$DIR" org/x` with DIR unset gives '', which the
    system reads as the current folder — pushing, inspecting or serving from wherever the shell happens to be."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty (an unset shell variable?); pass the path (write `.` for the current folder)")
    return text
