"""The gate against history, end to end on the tiny matrix: after two normal runs, a run in which one combo's steps
are made slower fails the session with a confirmed regression for that combo only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from faults_support import copy_baselines
from timing_support import prioritized

from fluxgate.judging.compare import REMEASURE

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]

INJECTORS = Path(__file__).resolve().parent / "injectors"  # slow_combo.py: `-p slow_combo` slows one combo
# +150 ms on steps of 10-25 ms: a 7-16x slowdown, far beyond what a shared CPU does to an unchanged combo (±25 %)
SLOWED = {"FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]", "FLUXGATE_SLOW_DELAY_S": "0.15"}


@pytest.fixture(scope="module")
def baselines_dir(tmp_path_factory) -> Path:
    """The CPU baselines without fixed speed and memory limits, so that only the judgement against history can fail
    a run in which a combo is slowed."""
    return copy_baselines(tmp_path_factory.mktemp("baselines") / "baselines")


@pytest.fixture(scope="module")
def window(tmp_path_factory, baselines_dir) -> Path:
    """A history of two normal runs (gate on: a run with the gate off never enters a window), made once for the
    tests that copy it (their verdicts are not what the tests are about)."""
    made = tmp_path_factory.mktemp("window")
    for _ in range(2):
        run_matrix(made, baselines_dir)
    return made / "history"


def run_matrix(tmp_path: Path, baselines_dir: Path, *extra: str, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "perf", "-q", "--device", "cpu", "--models", "flux1-dev",
               "--precisions", "bf16,nvfp4", "--history-dir", str(tmp_path / "history"),
               "--baselines-dir", str(baselines_dir), *extra]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INJECTORS), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environ,
                          preexec_fn=prioritized)


@pytest.mark.timing
def test_a_slowed_combo_is_a_confirmed_regression_and_fails_the_run(tmp_path, baselines_dir, window):
    shutil.copytree(window, tmp_path / "history")

    done = run_matrix(tmp_path, baselines_dir, "-p", "slow_combo", env=SLOWED)

    assert done.returncode == 1 and "2 passed" in done.stdout, done.stdout[-3000:]
    verdict_lines = [line.strip() for line in done.stdout.splitlines() if line.startswith("  flux1-dev[")]
    assert any(line.startswith("flux1-dev[nvfp4]: regression") and "confirmed by re-measurement" in line
               for line in verdict_lines), done.stdout[-3000:]
    # the unslowed combo's CPU noise stays under the CPU's 50 % minimum effect
    assert not any(line.startswith("flux1-dev[bf16]: regression") for line in verdict_lines), done.stdout[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("against history ("))
    assert header.startswith("against history (a confirmed regression fails the run): ") and "1 regression" in header
    newest = max((tmp_path / "history").glob("*.json"), key=lambda p: p.stat().st_mtime)
    records = json.loads(newest.read_text())["records"]
    assert ("flux1-dev[nvfp4]", REMEASURE) in [(r["combo"], r["outcome"]) for r in records]
    # the verdicts are written once, on the records, with the policy the gate judged by (CPU: a 50 % minimum effect)
    stored = {r["combo"]: r["history_verdict"] for r in records if r["outcome"] != REMEASURE}
    assert stored["flux1-dev[nvfp4]"]["outcome"] == "regression" and stored["flux1-dev[nvfp4]"]["remeasured"]
    assert stored["flux1-dev[bf16]"]["outcome"] != "regression"
    assert {verdict["policy"]["min_speed_effect"] for verdict in stored.values()} == {0.5}
    from fluxgate.showing.publish import write_report

    (summary, *_) = write_report(tmp_path / "history", tmp_path / "report", baselines_dir)
    assert "**Gate: FAILED** (1 regressed against history)" in summary.read_text()


@pytest.mark.timing
def test_with_the_history_gate_off_the_same_regression_is_reported_but_does_not_fail(tmp_path, baselines_dir, window):
    shutil.copytree(window, tmp_path / "history")

    # The same slowdown under a minimum effect larger than itself is no finding (the option reaches the rule).
    shutil.copytree(tmp_path / "history", tmp_path / "lenient" / "history")
    lenient = run_matrix(tmp_path / "lenient", baselines_dir, "-p", "slow_combo", "--history-gate", "off",
                         "--min-speed-effect", "100000", env=SLOWED)
    assert lenient.returncode == 0 and "flux1-dev[nvfp4]: regression" not in lenient.stdout, lenient.stdout[-3000:]

    done = run_matrix(tmp_path, baselines_dir, "-p", "slow_combo", "--history-gate", "off", env=SLOWED)

    assert done.returncode == 0 and "advisory: --history-gate off" in done.stdout, done.stdout[-3000:]
    assert "flux1-dev[nvfp4]: regression" in done.stdout


def test_a_bad_minimum_effect_is_a_usage_error_naming_the_option(tmp_path, baselines_dir):
    done = run_matrix(tmp_path, baselines_dir, "--min-speed-effect", "two")
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--min-speed-effect 'two': expected 'auto' or a percentage > 0" in done.stderr
