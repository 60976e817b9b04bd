"""The history as a folder on disk: `LocalFolderStore`, the default `HistoryStore`, and `RunHistory`, its run writer.

Both are `fluxgate.storing.fsstore`'s store and writer on fsspec's local filesystem (that module has the layout), with
the folder and the run file as `pathlib.Path`s. A run file is rewritten whole and atomically (temporary file +
rename) after every combo, so an interrupted run leaves a readable file holding every combo that finished, and
concurrent runners never mix their files.
"""

from __future__ import annotations

from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from fluxgate.storing.fsstore import FsspecStore, RunObject, load_paths
from fluxgate.storing.layout import MERGED_DIR, SHARDS_DIR

__all__ = ["LocalFolderStore", "RunHistory", "load_paths", "SHARDS_DIR", "MERGED_DIR"]


class RunHistory(RunObject):
    """The current run in a LocalFolderStore: `<directory>/<run_id>.json`, or `<directory>/.workers/<run_id>.json` for
    a shard; its images go to `<directory>/images/`, content-addressed."""

    @property
    def path(self) -> Path:
        """The run file (written on the first `append`)."""
        return Path(self.key)


class LocalFolderStore(FsspecStore):
    """A HistoryStore in one folder (layout: `fluxgate.storing.fsstore`). The folder need not exist yet."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        super().__init__(LocalFileSystem(), str(self.directory))

    def open_run(self, run_id: str, environment: dict, *, shard: bool = False) -> RunHistory:
        """The writer of run `run_id`; nothing is written before its first record. A shard's run file goes to
        `.workers/` until `merge`."""
        return RunHistory(self, run_id, environment, shard)
