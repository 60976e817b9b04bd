"""Storing: the history record (its typed form and schema) and where runs are kept. Imports neither torch nor
diffusers: reading, merging and publishing history work on a machine without them.

`open_store(location)` opens the history at a folder or a URL (see its docs for the backends).
"""

from __future__ import annotations

import os


def open_store(location: str | os.PathLike):
    """The HistoryStore at `location`: a folder path (`LocalFolderStore`, the default; need not exist yet) or a URL
    of any filesystem fsspec knows (`FsspecStore`): `s3://bucket/prefix` (S3 or an S3-compatible server; the `s3`
    extra installs s3fs), `gs://bucket/prefix` (gcsfs), `hf://datasets/<org>/<name>/<folder>` (huggingface_hub),
    `memory://name` (tests), `file:///path`. Storage options (an S3 endpoint, credentials) come from fsspec's own
    configuration, never from fluxgate: `FSSPEC_S3_ENDPOINT_URL=http://minio:9000` or a JSON/INI file in
    `~/.config/fsspec/` (`FSSPEC_CONFIG_DIR`), and the backend's usual variables (`AWS_ACCESS_KEY_ID`,
    `AWS_ENDPOINT_URL_S3`, `HF_TOKEN` ...). Nothing is read or written until the store is used.
    Raises HistoryError naming the location when no installed fsspec backend serves the URL."""
    from fluxgate.storing.fsio import is_url, resolve
    from fluxgate.storing.fsstore import FsspecStore
    from fluxgate.storing.local import LocalFolderStore

    if not is_url(location):
        return LocalFolderStore(location)
    fs, root = resolve(location)
    return LocalFolderStore(root) if FsspecStore(fs, root).local else FsspecStore(fs, root)
