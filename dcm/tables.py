"""The one table writer of the reports: markdown and HTML from a header and string cells."""

from __future__ import annotations

import html
from collections.abc import Sequence


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (no trailing newline); cells are written as given."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def html_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The same table as HTML, every cell escaped."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
