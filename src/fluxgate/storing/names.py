"""Names that come from records and become file names: checked against one strict pattern when a record is read,
and every path built from them checked to stay inside its folder when written (`contained`).

A record's `gpu_class`, `model`, `combo`, `run_id`, a case's name and an `image` are written by whoever writes the
history (a shared store, a pull request's run); a crafted one (`../../x`) must never make a reader write or read
outside the folder it was given.
"""

from __future__ import annotations

import re
from pathlib import Path

from fluxgate.errors import HistoryError

# One path component: letters, digits, dot, dash, underscore, plus the `@` of a case's image; not starting with a
# dot (no `..`, no hidden files); at most 128 characters.
NAME = r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}"
_NAME = re.compile(NAME)
_COMBO = re.compile(rf"{NAME}\[{NAME}\]")  # flux1-dev[nvfp4], flux1-dev[bf16-compile]
_IMAGE = re.compile(rf"{NAME}/{NAME}")  # <run_id>/<file>.png, relative to the store's root


def is_name(value: object) -> bool:
    """`value` is a safe single path component (see NAME)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def is_combo(value: object) -> bool:
    """`value` reads as a combo id, `model[variant]`, of safe names."""
    return isinstance(value, str) and _COMBO.fullmatch(value) is not None


def is_image(value: object) -> bool:
    """`value` is a record's image name: `<folder>/<file>` (`images/<sha256>.png`, or a run's folder before content
    addressing), both safe names."""
    return isinstance(value, str) and _IMAGE.fullmatch(value) is not None


def check_run_id(run_id: str, what: str = "--run-id") -> str:
    """`run_id`, or HistoryError (one line) when it is not a safe name: a run id becomes a file name."""
    if not is_name(run_id):
        raise HistoryError(f"{what} {run_id!r}: not a run id (letters, digits, '.', '_', '-'; no '/' or leading '.')")
    return run_id


def contained(root: Path, path: Path) -> Path:
    """`path`, resolved, when it lies inside `root` (resolved); HistoryError naming both otherwise."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise HistoryError(f"{path}: outside {root}; not written (a name from a record must stay in its folder)")
    return resolved
