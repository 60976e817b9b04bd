"""The history on any fsspec filesystem: `FsspecStore`, the one `HistoryStore` (a local folder is
`fluxgate.storing.local.LocalFolderStore`, this store on fsspec's local filesystem), and `RunObject`, its run writer.
Its layout (`fluxgate.storing.layout` names the folders; pruning is `fluxgate.storing.housekeeping`):

    <root>/<run_id>.json              one run: {"schema": 1, "run_id", "started", "environment", "records": [...]}
    <root>/images/<sha256>.png        the runs' images, content-addressed (a record's "image" is this path, relative
                                      to <root>; runs before kept theirs in <root>/<run_id>/)
    <root>/.workers/<run_id>.json     a shard's run (an xdist worker's) until merged, then removed
    <root>/.merged/<run_id>.json      runs of the root already merged into another run (kept, never read)

Writes are whole or nothing (`fsio.write_whole`): a run object is rewritten after every combo, so an interrupted run
leaves a readable object holding every combo that finished. Run ids are unique (`store.new_run_id`), so runners
writing at once never touch each other's objects; a merge writes the merged run before it sets the shards aside, and
readers skip a run that another run names in `merged_from`, so no record is lost or counted twice, even after a crash
in between. Others can write a shared store, so a reader trusts a `merged_from` entry only where it loses nothing:
the merged run holds a record of every combo of the named run (with `source_run_id` naming it) and is newer than it
(`store.holds_all_of`); a run object whose run id is not its file name is skipped, and a merge refuses a run id (its
own or a shard's) that names another run of the root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from fsspec.implementations.local import LocalFileSystem

from fluxgate.errors import HistoryError
from fluxgate.storing import housekeeping
from fluxgate.storing.fsio import backend_errors, resolve, write_whole
from fluxgate.storing.layout import IMAGES_DIR, LEFTOVER_AGE_S, MERGED_DIR, SHARDS_DIR
from fluxgate.storing.names import check_run_id, is_image
from fluxgate.storing.record import REMEASURE, Record
from fluxgate.storing.store import Run, holds_all_of, merge_runs, new_run_id, now, stamped
from fluxgate.storing.verdicts import HistoryVerdict

READERS = 16  # objects read at once from a network store


def dump(run: Run) -> bytes:
    """A run document as stored (strict JSON: NaN is refused). Raises ValueError for a value JSON cannot hold."""
    return (json.dumps(run.to_json(), indent=1, sort_keys=True, allow_nan=False, default=str) + "\n").encode()


def parse(data: bytes, source: str) -> Run:
    """The run in a stored document. Raises ValueError for bytes that are no JSON, HistoryError for JSON that is no
    run of a schema this version reads."""
    return Run.from_json(json.loads(data), source)


def _skip(source: str, error: Exception) -> None:
    warnings.warn(f"{source}: skipped unreadable history file ({type(error).__name__}: {error})", stacklevel=4)


@dataclass
class RunObject:
    """The current run in an FsspecStore: `<root>/<run_id>.json`, or `<root>/.workers/<run_id>.json` for a shard
    (`open_run(..., shard=True)`); its images go to `<root>/images/`, content-addressed (`save_image`)."""

    owner: FsspecStore
    run_id: str
    environment: dict
    shard: bool = False
    started: str = field(default_factory=now)
    records: list[Record] = field(default_factory=list)  # as stored

    @property
    def key(self) -> str:
        """The run object's path in the store's filesystem (written on the first `append`)."""
        return self.owner.join(*((SHARDS_DIR,) if self.shard else ()), f"{self.run_id}.json")

    @property
    def location(self) -> str:
        """The run object's path or URL."""
        return self.owner.display(self.key)

    @property
    def store(self) -> FsspecStore:
        """The store the run belongs to: the earlier runs this one is judged against."""
        return self.owner

    def save_image(self, combo_id: str, image) -> str:
        """Write a PIL image, whole, content-addressed: `images/<sha256 of its PNG, 32 hex digits>.png`, once per
        distinct image (a run whose images equal an earlier run's, as a deterministic combo's do, stores nothing
        new); returns that relative name (the record's `image`). `combo_id` is what the image shows (kept for the
        interface: the name no longer carries it). Raises OSError when it cannot be written."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # fast: a run saves dozens of 1024 px images
        data = buffer.getvalue()
        name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()[:32]}.png"
        path = self.owner.join(name)
        with backend_errors(self.owner.display(path)):
            present = self.owner.fs.exists(path)
        if present:  # named again: its time is renewed, so a pruner's hour of grace counts from this run
            try:
                self.owner.fs.touch(path, truncate=False)
            except (NotImplementedError, ValueError, OSError):
                present = False  # a store that cannot renew it (an object store): written again, the same bytes
        if not present:  # an equal name holds equal bytes: two writers of one image write the same object
            write_whole(self.owner.fs, path, data)
        return name

    def append(self, record: Record) -> Record:
        """Add one combo's record and rewrite the run object whole; returns the record as stored. Raises ValueError
        (JSON cannot hold a value) or OSError; the records stored before stay stored."""
        record = stamped(record, self.run_id)
        data = dump(Run(self.run_id, self.environment, (*self.records, record), self.started))
        write_whole(self.owner.fs, self.key, data)
        self.records.append(record)  # only once it is stored: a failed write never poisons later appends
        return record

    def record_verdicts(self, verdicts: Mapping[str, HistoryVerdict]) -> None:
        """Store each combo's verdict against history on its result record (not on a re-measurement) and rewrite the
        run object whole. Raises OSError when it cannot be written (the records in memory stay as they were)."""
        records = [dataclasses.replace(record, history_verdict=verdicts[record.combo])
                   if record.combo in verdicts and record.outcome != REMEASURE else record for record in self.records]
        write_whole(self.owner.fs, self.key, dump(Run(self.run_id, self.environment, tuple(records), self.started)))
        self.records[:] = records


class FsspecStore:
    """A HistoryStore under `root` of the fsspec filesystem `fs` (see the module docs for the layout). The root need
    not exist yet. Build one with `fluxgate.storing.open_store(location)`."""

    def __init__(self, fs, root: str):
        self.fs = fs
        self.root = root.rstrip("/") or root
        self.local = isinstance(fs, LocalFileSystem)

    def __str__(self) -> str:
        return self.display(self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def join(self, *names: str) -> str:
        """A path under the root."""
        return "/".join((self.root, *names))

    def display(self, path: str) -> str:
        """A path of the store's filesystem as users name it: a local path as it is, else a URL."""
        return path if self.local else self.fs.unstrip_protocol(path)

    # --- reading ---------------------------------------------------------------------------------------------------
    def _entries(self) -> list[dict]:
        """The root's entries, listed afresh (another runner may have written since); none for a missing root.
        Raises OSError when the root cannot be listed."""
        with backend_errors(str(self)):
            self.fs.invalidate_cache(self.root)
            try:
                return self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []

    def _run_objects(self) -> list[str]:
        names = (entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in self._entries() if entry["type"] == "file")
        return sorted(self.join(name) for name in names if name.endswith(".json"))

    def _read_many(self, paths: Sequence[str]) -> list[bytes | Exception]:
        """Each object's bytes, or the exception reading it raised; read at once from a network store."""
        def read(path: str) -> bytes | Exception:
            try:
                with backend_errors(self.display(path)):
                    return self.fs.cat_file(path)
            except OSError as error:
                return error

        if self.local or len(paths) < 2:
            return [read(path) for path in paths]
        with ThreadPoolExecutor(min(READERS, len(paths))) as pool:
            return list(pool.map(read, paths))

    def _runs(self) -> list[Run]:
        """Every readable run of the root, oldest first, less those another run really merged (`holds_all_of`)."""
        runs = []
        paths = self._run_objects()
        for path, data in zip(paths, self._read_many(paths)):
            if isinstance(data, FileNotFoundError):
                continue  # set aside by a merge since it was listed: the merged run holds its records
            try:
                if isinstance(data, Exception):
                    raise data
                run = parse(data, self.display(path))
                if f"{run.run_id}.json" != path.rsplit("/", 1)[-1]:
                    raise HistoryError(f"its run id {run.run_id} is not its file name")
                runs.append(run)
            except (OSError, ValueError, HistoryError) as error:
                _skip(self.display(path), error)
        by_id = {run.run_id: run for run in runs}
        hidden = set()
        for run in runs:
            for shard in run.merged_from or ():
                if shard in by_id and holds_all_of(run, by_id[shard]):
                    hidden.add(shard)
                elif shard in by_id:
                    warnings.warn(f"{self.display(self.join(run.run_id + '.json'))}: names run {shard} as merged but "
                                  "does not hold its records (or is older): both are read", stacklevel=3)
        return [run for run in runs if run.run_id not in hidden]

    def list_runs(self) -> list[str]:
        """Run ids, oldest first (run ids start with their UTC start time). Raises OSError when the root cannot be
        listed."""
        return [path.rsplit("/", 1)[-1].removesuffix(".json") for path in self._run_objects()]

    def load(self) -> list[Record]:
        """Every record under the root, oldest run first; unreadable run objects are skipped with a UserWarning
        naming them. A missing root holds no records. Raises OSError when the root cannot be listed."""
        return [record for run in self._runs() for record in run.readable()]

    def _candidates(self, run_id: str) -> tuple[str, str]:
        return self.join(f"{run_id}.json"), self.join(SHARDS_DIR, f"{run_id}.json")

    def _read_run(self, run_id: str) -> tuple[str, Run]:
        """Run `run_id` (of the root, else a shard's) and its path. Raises HistoryError when there is none or it is
        unreadable, naming it."""
        for path in self._candidates(run_id):
            data = self._read_many([path])[0]
            if not isinstance(data, FileNotFoundError):
                return path, self._parse_or_raise(data, self.display(path))
        raise HistoryError(f"{self}: no run {run_id}")

    @staticmethod
    def _parse_or_raise(data: bytes | Exception, source: str) -> Run:
        try:
            if isinstance(data, Exception):
                raise data
            return parse(data, source)
        except (OSError, ValueError) as error:
            raise HistoryError(f"{source}: not a readable history run file ({type(error).__name__}: {error})"
                               ) from None

    def load_run(self, run_id: str) -> list[Record]:
        """Raises HistoryError when the run is missing or unreadable, naming its object."""
        return self._read_run(run_id)[1].readable()

    def location(self, run_id: str) -> str:
        """Where run `run_id` is kept (where it would be, when it is not there yet). Raises OSError when the store
        cannot be reached."""
        root_path, shard_path = self._candidates(run_id)
        with backend_errors(str(self)):
            self.fs.invalidate_cache(self.root)
            return self.display(shard_path if not self.fs.isfile(root_path) and self.fs.isfile(shard_path)
                                else root_path)

    def open_run(self, run_id: str, environment: dict, *, shard: bool = False) -> RunObject:
        """The writer of run `run_id`; nothing is written before its first record. A shard's run goes to `.workers/`
        until `merge`. Raises HistoryError for a run id that is no safe file name."""
        return RunObject(self, check_run_id(run_id, "run id"), environment, shard)

    def read_image(self, name: str) -> bytes | None:
        """The bytes of `<root>/<name>` (a record's `image`), None when it is gone or unreadable or `name` is no image
        name (`is_image`: a record's crafted `../x` reads nothing outside the root)."""
        if not is_image(name):
            return None
        data = self._read_many([self.join(name)])[0]
        return None if isinstance(data, Exception) else data

    def image_location(self, name: str) -> str:
        """Where a record's `image` is kept."""
        return self.display(self.join(name))

    # --- pruning and merging ---------------------------------------------------------------------------------------
    def clean_leftovers(self, older_than_s: float = LEFTOVER_AGE_S) -> list[str]:
        """Crashed writers' temporary files removed (`housekeeping.clean_leftovers`)."""
        return housekeeping.clean_leftovers(self, older_than_s)

    def prune_images(self, keep_runs: int, min_age_s: float = LEFTOVER_AGE_S) -> list[str]:
        """All but the newest `keep_runs` runs' images removed (`housekeeping.prune_images`)."""
        return housekeeping.prune_images(self, keep_runs, min_age_s)

    def _list(self, folder: str) -> list[dict]:
        """A folder's entries, listed afresh; none for a missing folder. Raises OSError when it cannot be listed."""
        with backend_errors(self.display(folder)):
            self.fs.invalidate_cache(folder)
            try:
                return self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []

    def merge(self, run_ids: Sequence[str], *, run_id: str | None = None, mark: dict | None = None) -> str:
        """Join the runs `run_ids` of this store (shards, or runs of the root) into one new run, then remove the
        shards' objects and move the root's merged runs to `.merged/`; returns the new run's id. Raises HistoryError
        naming the object for a missing, unreadable or overlapping shard, leaving everything as it was."""
        sources = [(self.fs, self._read_run(shard)[0]) for shard in run_ids]
        return self._merge(sources, run_id, mark)[0].run_id

    def merge_files(self, locations: Sequence[str | os.PathLike], *, run_id: str | None = None,
                    mark: dict | None = None) -> tuple[str, list[tuple[str, str]]]:
        """`merge` for run files or objects anywhere, paths or URLs (`python -m fluxgate.merge`): the merged run goes
        under this root; a given run that sits in the root moves to `.merged/` (one in `.workers/` is removed, one
        elsewhere stays). Returns where the merged run is and the (from, to) moves. Raises HistoryError as `merge`
        does, and for a backend fsspec does not know."""
        sources = [resolve(location) for location in locations]
        merged, moved = self._merge(sources, run_id, mark, names=[os.fspath(location) for location in locations])
        return self.location(merged.run_id), moved

    def _merge(self, sources: list[tuple], run_id: str | None, mark: dict | None,
               names: list[str] | None = None) -> tuple[Run, list[tuple[str, str]]]:
        names = names or [self._display_in(fs, path) for fs, path in sources]
        shards = []
        for name, (fs, path) in zip(names, sources):
            try:
                with backend_errors(name):
                    data = fs.cat_file(path)
            except OSError as error:
                data = error
            shards.append((name, self._parse_or_raise(data, name)))
        merged = merge_runs(shards, check_run_id(run_id) if run_id else new_run_id(), mark)
        if merged.run_id in merged.merged_from:
            raise HistoryError(f"--run-id {merged.run_id}: the id of a shard; the merged run needs an id of its own")
        self._refuse_collisions(merged, sources)
        write_whole(self.fs, self.join(f"{merged.run_id}.json"), dump(merged))
        return merged, self._set_aside(sources)

    def _refuse_collisions(self, merged: Run, sources: list[tuple]) -> None:
        """HistoryError when the merged run's id, or a shard's, names a run of the root other than that shard's own
        file: the merged run would overwrite it, or its `merged_from` would name (and hide) a run it did not merge."""
        own = {self._canonical(fs, path) for fs, path in sources}
        with backend_errors(str(self)):
            for run_id, what in ((merged.run_id, "--run-id"), *((shard, "a shard's run id") for shard in
                                                              merged.merged_from)):
                path = self.join(f"{run_id}.json")
                if self.fs.isfile(path) and self._canonical(self.fs, path) not in own:
                    raise HistoryError(f"{what} {run_id}: a run with this id is already in {self}; not merged")

    def _display_in(self, fs, path: str) -> str:
        return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)

    def _canonical(self, fs, path: str) -> str:
        return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)

    def _set_aside(self, sources: list[tuple]) -> list[tuple[str, str]]:
        """Merged shards must not be read again (their measurements would count twice). The merged run is stored
        already, so a crash in here loses nothing, and readers skip a shard the merged run names."""
        moved = []
        root = self._canonical(self.fs, self.root)
        for canonical, (fs, path) in {self._canonical(fs, path): (fs, path) for fs, path in sources}.items():
            parent, name = canonical.rsplit("/", 1)
            with backend_errors(self._display_in(fs, path)):
                if parent == f"{root}/{SHARDS_DIR}":
                    fs.rm(path)
                elif parent == root:
                    aside = self.join(MERGED_DIR, name)
                    self.fs.makedirs(self.join(MERGED_DIR), exist_ok=True)
                    self.fs.mv(path, aside)
                    moved.append((self._display_in(fs, path), self.display(aside)))
        return moved


def load_paths(locations: Sequence[str | os.PathLike]) -> list[Record]:
    """Every record of the given run files or objects and folders of them (each folder read as a store), paths or
    URLs, in the order given; unreadable runs are skipped with a warning naming them. Raises HistoryError for a URL
    no installed fsspec backend serves, OSError when a folder cannot be listed."""
    records = []
    for location in locations:
        fs, path = resolve(location)
        with backend_errors(os.fspath(location)):
            folder = fs.isdir(path)
        if folder:
            records += FsspecStore(fs, path).load()
            continue
        try:
            with backend_errors(os.fspath(location)):
                data = fs.cat_file(path)
            records += parse(data, os.fspath(location)).readable()
        except (OSError, ValueError, HistoryError) as error:
            _skip(os.fspath(location), error)
    return records
