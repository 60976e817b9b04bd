"""Writing whole objects and naming locations on fsspec filesystems: `write_whole` (readers never see part of an
object, a crash never leaves half of one), `is_url`, `resolve` (a path or URL to a filesystem and a path) and
`backend_errors` (a backend's own exceptions as OSError). Only fsspec is imported here; a URL's backend (s3fs, gcsfs,
huggingface_hub) is imported by fsspec when the URL is resolved.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem

from fluxgate.errors import HistoryError
from fluxgate.files import atomic_write

# Filesystems whose single write of a whole object is atomic (an object appears whole or not at all). Any other
# non-local filesystem gets a temporary object and a rename (`write_whole`).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "hf", "memory"})


def is_url(location: str | os.PathLike) -> bool:
    """True for a URL (`s3://bucket/prefix`, `memory://h`, `simplecache::s3://...`), False for a plain path."""
    return "://" in os.fspath(location)


@contextmanager
def backend_errors(what: str) -> Iterator[None]:
    """Re-raise a backend's own exception (botocore's EndpointConnectionError, NoCredentialsError ...) as OSError
    naming `what`, so that callers handle one kind of failure. OSError passes unchanged."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - every backend has its own exception types
        raise OSError(f"{what}: {type(error).__name__}: {error}") from error


def write_whole(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old object or the new one, never part of one, and a crash
    leaves no half-written object: a temporary file and a rename locally, one PUT on an object store, a temporary
    object and a rename elsewhere. Raises OSError when it cannot be written."""
    if isinstance(fs, LocalFileSystem):
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
        return
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    with backend_errors(fs.unstrip_protocol(path)):
        if protocols & OBJECT_STORES:
            fs.pipe_file(path, data)
            return
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        temporary = f"{parent}/.{name}.{secrets.token_hex(4)}.tmp" if parent else f".{name}.tmp"
        fs.makedirs(parent, exist_ok=True)
        try:
            fs.pipe_file(temporary, data)
            fs.mv(temporary, path)
        finally:
            if fs.exists(temporary):
                fs.rm(temporary)


def resolve(location: str | os.PathLike) -> tuple:
    """The fsspec filesystem and path of a location: a plain path on the local filesystem (kept as given, relative or
    not), a URL through fsspec, with the storage options of fsspec's configuration (`FSSPEC_<PROTOCOL>_<OPTION>`
    variables, files in `FSSPEC_CONFIG_DIR`). Raises HistoryError naming the location for an unknown protocol or a
    backend that is not installed (fsspec names the package)."""
    text = os.fspath(location)
    if not is_url(text):
        return LocalFileSystem(), text
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as error:
        raise HistoryError(f"{text}: no fsspec filesystem for this URL ({type(error).__name__}: {error})") from None
