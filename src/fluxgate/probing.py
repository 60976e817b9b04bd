"""Every place a run will write, tried before any combo runs: a small object written and deleted in each, so that a
history store that is a file, a read-only folder, a bucket without credentials or an endpoint that does not answer
is one line at the start instead of a traceback after the whole matrix was measured.

Only fsspec (through `storing.fsio`) is imported here; a remote store is given `PROBE_TIMEOUT_S` to answer.
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import Iterable

from fluxgate.errors import FluxgateError
from fluxgate.storing.fsio import backend_errors, is_url, resolve

# Long enough for a distant object store's first request (credentials, a TLS handshake, a PUT and a DELETE), short
# against a matrix: an endpoint that does not answer otherwise costs botocore's retries on every combo (~40 s each).
PROBE_TIMEOUT_S = 10.0
PROBE_NAME = ".fluxgate-write-probe"
# Storage options of the probe's own filesystem instance, per protocol: one attempt, short connect and read
# timeouts, so that a closed port or a dead endpoint is a cause in about a second instead of the timeout (botocore
# retries with backoff by default). Options the user configured for fsspec still apply.
FAST_FAILING = {protocol: {"config_kwargs": {"connect_timeout": 5, "read_timeout": 5,
                                              "retries": {"max_attempts": 1}}}
                for protocol in ("s3", "s3a")}


class UnwritableError(FluxgateError):
    """An output location cannot be written: one line naming the option, the location and the cause."""


def why_not_writable(location: str | os.PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a small object can be written in `location` (a folder, made if missing, or an fsspec URL) and
    deleted again within `timeout_s` seconds; otherwise the cause, in one line."""
    answer: list[str | None] = []
    # A daemon thread: a store that never answers is abandoned, not waited for, and does not keep the process alive.
    probe = threading.Thread(target=lambda: answer.append(_write_and_delete(os.fspath(location))),
                             name="fluxgate-write-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    if not answer:
        return f"no answer within {timeout_s:g} s (is the endpoint reachable?)"
    return answer[0]


def check_writable(locations: Iterable[tuple[str, str | os.PathLike]], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Probe each `(option, location)`; raises UnwritableError naming the first that cannot be written."""
    for option, location in locations:
        cause = why_not_writable(location, timeout_s)
        if cause is not None:
            raise UnwritableError(f"{option} {os.fspath(location)}: cannot write there ({cause})")


def _write_and_delete(location: str) -> str | None:
    try:
        fs, root = _filesystem(location)
        if not is_url(location):
            if os.path.exists(root) and not os.path.isdir(root):
                return "it is a file, not a folder"
            os.makedirs(root, exist_ok=True)  # the run makes it anyway
        probe = f"{root.rstrip('/')}/{PROBE_NAME}-{secrets.token_hex(4)}"
        with backend_errors(location):
            fs.pipe_file(probe, b"fluxgate checks that it may write here; this object is deleted at once\n")
            fs.rm_file(probe)
    except Exception as error:  # noqa: BLE001 - every backend has its own exception types; each is one line here
        return _one_line(error)
    return None


def _filesystem(location: str) -> tuple:
    """`fsio.resolve`, with FAST_FAILING's options for a URL of those protocols."""
    protocol = location.split("://", 1)[0]
    if not is_url(location) or protocol not in FAST_FAILING:
        return resolve(location)
    import fsspec.core

    return fsspec.core.url_to_fs(location, **FAST_FAILING[protocol])


def _one_line(error: Exception) -> str:
    """The error's type and first line, at most 300 characters (botocore's messages carry whole URLs)."""
    cause = error.__cause__ if isinstance(error, OSError) and error.__cause__ is not None else error
    text = " ".join(str(cause).split()) or "no message"
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(cause).__name__}: {text}"


def run_outputs(settings) -> list[tuple[str, str]]:
    """`(option, location)` of each place a run with these `settings.Settings` writes: the history store, the fixture
    cache, the report folder when asked for, the baselines folder when writing baselines."""
    outputs = [("--history-dir", settings.history_dir), ("--fixture-cache", os.fspath(settings.fixture_cache))]
    if settings.report_dir is not None:
        outputs.append(("--report-dir", os.fspath(settings.report_dir)))
    if settings.write_baselines:
        outputs.append(("--baselines-dir", os.fspath(settings.baselines_dir)))
    return outputs
