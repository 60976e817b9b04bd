"""Numbers and record text as the reports write them."""

from __future__ import annotations

import re

_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
NONE = "—"  # a value that was not measured


def number(value, spec: str, none: str = NONE) -> str:
    """`format(value, spec)`, or `none` for None (e.g. `number(5.8, ".3f")` -> "5.800")."""
    return none if value is None else format(value, spec)


def md_text(value) -> str:
    """A value from a record or file as markdown text: on one line, each `<` that could open a tag, comment or
    autolink (one before a letter, `/`, `!` or `?`: CommonMark's raw HTML) as `&lt;`, so that a markdown renderer (a
    PR comment, the dashboard) shows the text and never reads a tag in it (`< min 0.98`, `->` stay as they are)."""
    return _TAG_OPEN.sub("&lt;", " ".join(str(value).splitlines()))


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 combo`, `2 combos`, `0 combos`; `plural` where adding "s" is not it:
    `counted(n, "combo was", "combos were")`."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
