"""The dashboard's output folder: only ever a folder the dashboard made, and only its own files removed.

`Site(out, history)` refuses (`OutFolderError`, one line) an `out` that is the history folder or holds it, and an
existing `out` that holds a file the dashboard did not write: its marker file `.fluxgate-dashboard` lists every file
an earlier build wrote, and only those are removed before a new build. Every file is written through `Site.write_text`
/ `Site.copy` / `Site.adopt`, which check that its path (built from record names) stays inside `out`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fluxgate.errors import FluxgateError
from fluxgate.storing.names import contained

MARKER = ".fluxgate-dashboard"  # JSON: {"files": [paths relative to the folder]}


class OutFolderError(FluxgateError):
    """An --out folder the dashboard must not write into (a usage error: exit 4)."""


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() or path.is_symlink()}


class Site:
    """Files written under `out`, recorded in its marker so the next build removes exactly them."""

    def __init__(self, out: Path, history: Path | None):
        self.out, self.files = Path(out), set()
        root = self.out.resolve()
        if history is not None:
            held = Path(history).resolve()
            if held == root or root in held.parents:
                raise OutFolderError(f"--out {out}: is or holds the history folder {history}; choose another folder")
        if self.out.exists():
            self._clear_earlier()
        self.out.mkdir(parents=True, exist_ok=True)

    def _clear_earlier(self) -> None:
        if not self.out.is_dir():
            raise OutFolderError(f"--out {self.out}: not a folder")
        found = _files(self.out)
        marker = self.out / MARKER
        if not found:
            return
        if not marker.is_file():
            raise OutFolderError(f"--out {self.out}: holds {len(found)} file(s) the dashboard did not write (no "
                                 f"{MARKER} marker), e.g. {sorted(found)[0]}; choose an empty or new folder")
        try:
            listed = set(json.loads(marker.read_text())["files"])
        except (ValueError, KeyError, TypeError) as error:
            raise OutFolderError(f"{marker}: unreadable marker ({error}); remove the folder by hand") from None
        foreign = found - listed - {MARKER}
        if foreign:
            raise OutFolderError(f"--out {self.out}: holds {len(foreign)} file(s) the dashboard did not write, e.g. "
                                 f"{sorted(foreign)[0]}; not touched: move them or choose another folder")
        for name in sorted(listed & found):
            contained(self.out, self.out / name).unlink()
        for folder, _, _ in sorted(os.walk(self.out), key=lambda entry: -len(entry[0])):
            if Path(folder) != self.out and not any(Path(folder).iterdir()):
                Path(folder).rmdir()

    def path(self, name: str) -> Path:
        """`out/name`, checked to stay inside `out`; its folder made."""
        path = self.out / name
        contained(self.out, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write `out/name` and record it."""
        path = self.path(name)
        path.write_text(text)
        return self.adopt(path)

    def copy(self, source: Path, name: str) -> Path:
        """Copy `source` to `out/name` and record it."""
        path = self.path(name)
        shutil.copy(source, path)
        return self.adopt(path)

    def adopt(self, path: Path) -> Path:
        """Record a file another writer put under `out` (a report's), after checking it lies there."""
        self.files.add(contained(self.out, path).relative_to(self.out.resolve()).as_posix())
        self.seal()
        return path

    def seal(self) -> None:
        """Write the marker listing every file written so far (after each file: an interrupted build stays
        removable)."""
        (self.out / MARKER).write_text(json.dumps({"files": sorted(self.files)}) + "\n")
