"""The history as a folder on disk: `LocalFolderStore`, the first `HistoryStore`, and `RunHistory`, its run writer.

    <dir>/<run_id>.json              one run: {"schema": 1, "run_id", "started", "environment", "records": [...]}
    <dir>/<run_id>/<combo>.png       its images (a record's "image" is this path, relative to <dir>)
    <dir>/.workers/<run_id>.json     a shard's run (an xdist worker's) until merged, then removed
    <dir>/.merged/<run_id>.json      run files of the folder already merged into another run (kept, never read)

A run file is rewritten whole and atomically (temporary file + rename) after every combo, so an interrupted run leaves
a readable file holding every combo that finished, and concurrent runners never mix their files.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fluxgate.errors import HistoryError
from fluxgate.files import atomic_write
from fluxgate.storing.record import Record
from fluxgate.storing.store import Run, file_name, merge_runs, new_run_id, now, stamped

SHARDS_DIR = ".workers"  # shard runs not merged yet: readers do not look there
MERGED_DIR = ".merged"  # run files of the folder merged into another run: kept, so nothing is lost, and not read


def _dump(run: Run) -> str:
    return json.dumps(run.to_json(), indent=1, sort_keys=True, allow_nan=False, default=str) + "\n"


def read_run(path: Path) -> Run:
    """The run in one run file. Raises OSError or ValueError for an unreadable file or JSON, HistoryError for JSON
    that is no run of a schema this version reads."""
    return Run.from_json(json.loads(Path(path).read_text()), str(path))


def _records_or_warning(path: Path) -> list[Record]:
    """The records of one run file, each with its fingerprint; an unreadable file gives [] and a warning naming it."""
    try:
        return read_run(path).readable()
    except (OSError, ValueError, HistoryError) as error:
        warnings.warn(f"{path}: skipped unreadable history file ({type(error).__name__}: {error})", stacklevel=3)
        return []


def load_paths(paths: Sequence[Path]) -> list[Record]:
    """Every record of the given run files and folders of them (a folder read as a LocalFolderStore), in the order
    given; unreadable files are skipped with a warning naming them."""
    return [record for path in map(Path, paths)
            for record in (LocalFolderStore(path).load() if path.is_dir() else _records_or_warning(path))]


@dataclass
class RunHistory:
    """The current run in a LocalFolderStore: `<directory>/<run_id>.json`, or `<file_dir>/<run_id>.json` for a shard
    (`LocalFolderStore.open_run(..., shard=True)`); its images always go to `<directory>/<run_id>/`."""

    directory: Path
    run_id: str
    environment: dict
    started: str = field(default_factory=now)
    records: list[Record] = field(default_factory=list)  # as stored
    file_dir: Path | None = None  # where the run file goes when not `directory` (a shard's, until merged)

    @property
    def path(self) -> Path:
        """The run file (written on the first `append`)."""
        return Path(self.file_dir or self.directory) / f"{self.run_id}.json"

    @property
    def location(self) -> str:
        """The run file's path, as text."""
        return str(self.path)

    @property
    def store(self) -> LocalFolderStore:
        """The folder's store: the earlier runs this one is judged against."""
        return LocalFolderStore(self.directory)

    def save_image(self, combo_id: str, image) -> str:
        """Write a PIL image as `<run_id>/<combo>.png` beside the run; returns that relative path (the record's
        `image`). Raises OSError when it cannot be written."""
        relative = f"{self.run_id}/{file_name(combo_id)}.png"
        atomic_write(Path(self.directory) / relative, lambda tmp: image.save(tmp, format="PNG"))
        return relative

    def append(self, record: Record) -> Record:
        """Add one combo's record and rewrite the run file atomically; returns the record as stored. Raises
        ValueError (JSON cannot hold a value) or OSError; the records stored before stay stored."""
        record = stamped(record, self.run_id)
        text = _dump(Run(self.run_id, self.environment, (*self.records, record), self.started))
        atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.records.append(record)  # only once it is on disk: a failed write never poisons later appends
        return record


class LocalFolderStore:
    """A HistoryStore in one folder (see the module docs for the layout). The folder need not exist yet."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def __str__(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"LocalFolderStore({str(self.directory)!r})"

    def _run_files(self) -> list[Path]:
        return sorted(self.directory.glob("*.json"))

    def _run_path(self, run_id: str) -> Path:
        """The file of run `run_id`: in the folder, else a shard's; raises HistoryError when there is none."""
        for path in (self.directory / f"{run_id}.json", self.directory / SHARDS_DIR / f"{run_id}.json"):
            if path.is_file():
                return path
        raise HistoryError(f"{self.directory}: no run {run_id}")

    def list_runs(self) -> list[str]:
        """Run ids, oldest first (run ids start with their UTC start time)."""
        return [path.stem for path in self._run_files()]

    def load(self) -> list[Record]:
        """Every record in the folder, oldest run first; unreadable run files are skipped with a UserWarning naming
        them. A missing folder holds no records."""
        return [record for path in self._run_files() for record in _records_or_warning(path)]

    def load_run(self, run_id: str) -> list[Record]:
        """Raises HistoryError when the run is missing or unreadable, naming its file."""
        path = self._run_path(run_id)
        try:
            return read_run(path).readable()
        except (OSError, ValueError) as error:
            raise HistoryError(f"{path}: not a readable history run file ({type(error).__name__}: {error})") from None

    def location(self, run_id: str) -> str:
        """The path of run `run_id`'s file (where it would be, when there is none yet)."""
        try:
            return str(self._run_path(run_id))
        except HistoryError:
            return str(self.directory / f"{run_id}.json")

    def open_run(self, run_id: str, environment: dict, *, shard: bool = False) -> RunHistory:
        """The writer of run `run_id`; nothing is written before its first record. A shard's run file goes to
        `.workers/` until `merge`."""
        return RunHistory(self.directory, run_id, environment,
                          file_dir=self.directory / SHARDS_DIR if shard else None)

    def read_image(self, name: str) -> bytes | None:
        """The bytes of `<dir>/<name>` (a record's `image`), None when it is gone or unreadable."""
        try:
            return (self.directory / name).read_bytes()
        except OSError:
            return None

    def image_location(self, name: str) -> str:
        """The path of a record's `image`, as text."""
        return str(self.directory / name)

    def prune_images(self, keep_runs: int) -> list[str]:
        """Delete the image folders (`<run_id>/`, and those of the shards a merged run came from) of all but the
        newest `keep_runs` runs; their records stay, with an `image` that no longer exists (reports say so). Returns
        the folders removed. A GPU run's 16 PNGs are ~40 MB: without this the history grows without bound. Raises
        OSError when the folder cannot be listed."""
        runs = self._run_files()
        removed = []
        for path in runs[:max(0, len(runs) - keep_runs)]:
            for folder in sorted(self.directory / name for name in {path.stem} | _image_folders(path)):
                if folder.is_dir() and folder.parent == self.directory:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(str(folder))
        return removed

    def merge(self, run_ids: Sequence[str], *, run_id: str | None = None, mark: dict | None = None) -> str:
        """Join the runs `run_ids` of this store (shards, or runs of the folder) into one new run, then remove the
        shard files and move the folder's merged run files to `.merged/`; returns the new run's id. Raises
        HistoryError naming the file for a missing, unreadable or overlapping shard, leaving everything as it was."""
        path, _ = self.merge_files([self._run_path(shard) for shard in run_ids], run_id=run_id, mark=mark)
        return path.stem

    def merge_files(self, paths: Sequence[Path], *, run_id: str | None = None, mark: dict | None = None
                    ) -> tuple[Path, list[tuple[Path, Path]]]:
        """`merge` for run files anywhere (`python -m fluxgate.merge`): the merged run goes into this folder; a
        given file that sits in the folder moves to `.merged/` (one in `.workers/` is removed, one elsewhere stays).
        Returns the merged run's file and the (from, to) moves. Raises HistoryError as `merge` does."""
        shards = []
        for path in map(Path, paths):
            try:
                shards.append((str(path), read_run(path)))
            except (OSError, ValueError) as error:
                raise HistoryError(f"{path}: not a readable history run file ({type(error).__name__}: {error})"
                                   ) from None
        merged = merge_runs(shards, run_id or new_run_id(), mark)
        target = self.directory / f"{merged.run_id}.json"
        atomic_write(target, lambda tmp: tmp.write_text(_dump(merged)))
        return target, self._set_aside([Path(path) for path in paths])

    def _set_aside(self, paths: list[Path]) -> list[tuple[Path, Path]]:
        """Merged shards must not be read again (their measurements would count twice)."""
        moved = []
        folder = self.directory.resolve()
        for path in dict.fromkeys(paths):
            parent = path.resolve().parent
            if parent == folder / SHARDS_DIR:
                path.unlink(missing_ok=True)
            elif parent == folder:
                aside = self.directory / MERGED_DIR
                aside.mkdir(exist_ok=True)
                path.replace(aside / path.name)
                moved.append((path, aside / path.name))
        return moved


def _image_folders(path: Path) -> set[str]:
    """The image folders a run file's records name (a merged run's images stay in its shards' folders); read
    leniently: an unreadable file names none."""
    try:
        records = json.loads(path.read_text()).get("records") or []
        return {str(record["image"]).split("/")[0] for record in records
                if isinstance(record, dict) and record.get("image")}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
