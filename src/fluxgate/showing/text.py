"""Numbers as the reports write them."""

from __future__ import annotations

NONE = "—"  # a value that was not measured


def number(value, spec: str, none: str = NONE) -> str:
    """`format(value, spec)`, or `none` for None (e.g. `number(5.8, ".3f")` -> "5.800")."""
    return none if value is None else format(value, spec)
