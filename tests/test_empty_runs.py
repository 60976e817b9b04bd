"""A gate run that measured nothing cannot pass, and a bad option stops the run before the first combo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider", "-m", "not faults",
               "--history-dir", str(tmp_path / "history"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                               "FLUXGATE_MODELS": str(tmp_path / "no-models-here")})


@pytest.mark.parametrize("args, reason", [
    (("--device", "cuda", "--models", "z-image-turbo", "--precisions", "bf16,nvfp4"), "2x --device cuda: no CUDA device"),
    (("--device", "cpu", "--profile", "real", "--models", "z-image-turbo", "--precisions", "bf16"),
     "1 of 1 selected skipped (1x z-image-turbo"),
])
def test_a_run_whose_every_combo_was_skipped_fails_saying_so(tmp_path, args, reason):
    done = pytest_run(tmp_path, *args)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("FAIL: no combo was measured"))
    assert reason in line and "--allow-empty" in line
    allowed = pytest_run(tmp_path, *args, "--allow-empty")
    assert allowed.returncode == 0 and "FAIL: no combo" not in allowed.stdout, allowed.stdout[-2000:]


@pytest.mark.parametrize("option, value, problem", [
    ("--steps", "0", "must be at least 1"), ("--steps", "-3", "must be at least 1"),
    ("--steps", "many", "is not a whole number"), ("--history-window", "0", "must be at least 1"),
    ("--warmup-steps", "-1", "must be at least 0"), ("--device", "cuda:x", "expected auto, cpu, cuda or cuda:N"),
    ("--telemetry-interval-ms", "-5", "must be >= 0"), ("--vram-budget-gib", "0", "must be > 0"),
    ("--cpu-threads", "0", "must be at least 1"),
])
def test_a_bad_option_value_is_a_usage_error_before_any_combo_runs(tmp_path, option, value, problem):
    done = pytest_run(tmp_path, "--device", "cpu", option, value) if option != "--device" else \
        pytest_run(tmp_path, option, value)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"argument {option}: '{value}': {problem}" in done.stderr or \
        f"argument {option}: {value!r} {problem}" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "history").exists()


@pytest.mark.parametrize("args, problem", [
    (("--prompts", "no-such-prompts.toml"), "--prompts "),
    (("--profile", "real", "--models-file", "no-such-models.toml"), "--models-file "),
])
def test_a_missing_input_file_is_one_usage_error_before_any_combo(tmp_path, args, problem):
    done = pytest_run(tmp_path, "--device", "cpu", *args)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if problem in line)
    assert line.endswith(": not found")
