"""The README's code blocks as the tests read them: an example tagged `# readme-test: <tag>` must run and print what
its comments say (one place that finds them, for every test of a README example)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    """Every fenced code block of `language` in README.md, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_example(tag: str) -> str:
    """The one Python block that starts with `# readme-test: <tag>`."""
    [block] = [block for block in readme_blocks("python") if block.startswith(f"# readme-test: {tag}\n")]
    return block
