"""Names from configs and users put into Markdown as text: a table cell (`markdown_cell`) or a code span
(`markdown_code`) that no line break, `|`, backtick or HTML in the name can end or turn into markup. Plain text
functions (no project imports), so the options' card rows and the card renderer share them."""

from __future__ import annotations

import html
import re
from typing import Any

LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
# an underscore inside a word opens no emphasis (CommonMark), so `task_a` stays as it is written
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*\[\]|~!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def markdown_cell(value: Any) -> str:
    """`value` as the text of one Markdown table cell, shown as it is: names (tasks, labels, datasets, folders) come
    from configs and users, so a line break, `|`, HTML or link syntax in one must neither end the row or the table
    (a re-evaluation finds its section by its headings) nor reach the page as markup."""
    text = LINE_BREAKS.sub(" ", str(value))
    return html.escape(_MARKDOWN_PUNCTUATION.sub(r"\\\1", text), quote=False)


def markdown_item(value: Any) -> str:
    """`markdown_cell` for text that begins a line (a list item's): a leading `#`, `-`, `+`, `=` or `1.` would open
    a heading, a list or a numbered list inside the item, so it is escaped too (leading spaces dropped)."""
    text = markdown_cell(value).lstrip()
    ordered = re.match(r"(\d{1,9})([.)])", text)
    if ordered:
        return f"{ordered.group(1)}\\{ordered.group(2)}{text[ordered.end():]}"
    return "\\" + text if text[:1] in ("#", "-", "+", "=") else text


def markdown_text(cell: str) -> str:
    """The text a `markdown_cell` shows (its escapes undone): the title read back as the model's name."""
    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell))


def markdown_code(value: Any) -> str:
    """`value` as an inline code span: a fence longer than any backtick run in it (CommonMark), line breaks as spaces;
    the rest of a code span is shown literally."""
    text = LINE_BREAKS.sub(" ", str(value))
    fence = "`" * (longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_code_cell(value: Any) -> str:
    """`markdown_code` inside a table cell: `|` escaped too (GFM splits cells before it reads code spans)."""
    return markdown_code(str(value).replace("|", "\\|"))


def longest_backtick_run(text: str) -> int:
    """The longest run of backticks in `text`: a code fence around it must be longer."""
    return max((len(run) for run in re.findall(r"`+", text)), default=0)
