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


SHELL_LANGUAGES = ("bash", "sh", "shell", "console")


def shell_lines(text: str) -> list[str]:
    """Every line of a document's shell blocks, in order, a line continued with a backslash joined to the next."""
    blocks = [block for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
              if language in SHELL_LANGUAGES]
    return [line for block in blocks for line in re.sub(r"\\\n", " ", block).splitlines()]
