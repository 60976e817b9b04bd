"""Every place a run writes is tried at its start (`fluxgate.probing`): a file named as a folder, a read-only folder,
an S3 endpoint that does not answer or a store that hangs is one line naming the location and the cause, before any
combo runs (exit code 4); a writable folder or memory:// store passes and keeps no probe object."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from fluxgate import probing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder this user cannot write in: a mode 0555 folder, or (root writes anywhere) one under /sys, where the
    kernel lets no one create files."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root without /sys: no folder root cannot write")
    return Path("/sys/kernel/fluxgate-history")


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangingFileSystem(MemoryFileSystem):
    """A store whose writes never answer (an endpoint that accepts the connection and then says nothing)."""

    protocol = "fluxgate-hang"

    def pipe_file(self, path, value, **kwargs):
        time.sleep(30)


def test_a_writable_folder_passes_is_made_if_missing_and_keeps_no_probe_file(tmp_path):
    folder = tmp_path / "new" / "history"
    assert probing.why_not_writable(folder) is None
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_memory_store_passes_and_keeps_no_probe_object():
    assert probing.why_not_writable("memory://probing-test/history") is None
    assert fsspec.filesystem("memory").find("/probing-test") == []


def test_a_file_named_as_the_folder_is_named_as_such(tmp_path):
    (tmp_path / "history").write_text("not a folder")
    assert probing.why_not_writable(tmp_path / "history") == "it is a file, not a folder"


def test_a_read_only_folder_names_the_os_error(read_only_folder):
    cause = probing.why_not_writable(read_only_folder)
    assert cause is not None and cause.startswith(("PermissionError", "OSError")), cause


def test_an_s3_endpoint_on_a_closed_port_fails_within_seconds(monkeypatch):
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fluxgate-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fluxgate-test")
    started = time.monotonic()
    cause = probing.why_not_writable("s3://bucket/history")
    assert cause is not None and cause.startswith("EndpointConnectionError: Could not connect"), cause
    assert time.monotonic() - started < 5  # one attempt, not botocore's retries (10 s)


def test_a_store_that_never_answers_is_given_up_after_the_timeout():
    fsspec.register_implementation(HangingFileSystem.protocol, HangingFileSystem, clobber=True)
    started = time.monotonic()
    cause = probing.why_not_writable(f"{HangingFileSystem.protocol}://bucket/history", timeout_s=0.5)
    assert cause == "no answer within 0.5 s (is the endpoint reachable?)"
    assert time.monotonic() - started < 2


def test_check_writable_names_the_option_the_location_and_the_cause(tmp_path):
    (tmp_path / "report").write_text("")
    with pytest.raises(probing.UnwritableError) as raised:
        probing.check_writable([("--history-dir", tmp_path / "history"), ("--report-dir", tmp_path / "report")])
    assert str(raised.value) == f"--report-dir {tmp_path / 'report'}: cannot write there (it is a file, not a folder)"


def test_a_run_with_an_unwritable_history_stops_before_any_combo_in_one_line(tmp_path):
    (tmp_path / "history").write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "perf", "-q", "--device", "cpu", "--models", "flux1-dev", "--precisions",
         "bf16", "--history-dir", str(tmp_path / "history"), "--fixture-cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip() == (f"ERROR: --history-dir {tmp_path / 'history'}: cannot write there (it is a file, "
                                   "not a folder)")
    assert done.stdout.strip().startswith("no tests ran"), done.stdout  # pytest's closing line, nothing else
    assert not (tmp_path / "cache").exists()  # no combo was built


@pytest.mark.parametrize("command", ["publish", "dashboard"])
def test_the_report_and_dashboard_commands_refuse_an_unwritable_out_folder_in_one_line(tmp_path, capsys, command):
    main = importlib.import_module(f"fluxgate.{command}").main
    (tmp_path / "history").mkdir()
    (tmp_path / "out").write_text("not a folder")
    assert main(["--history-dir", str(tmp_path / "history"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fluxgate.{command}: error: --out {tmp_path / 'out'}: cannot write there (it is a file, not a folder)"]
