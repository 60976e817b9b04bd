"""The gate against history, end to end on the tiny matrix: after two normal runs, a run in which one combo's steps
are made slower fails the session with a confirmed regression for that combo only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INJECTORS = Path(__file__).resolve().parent / "injectors"  # slow_combo.py: `-p slow_combo` slows one combo


def run_matrix(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "perf", "-q", "--device", "cpu", "--models", "flux1-dev",
               "--precisions", "bf16,nvfp4", "--history-dir", str(tmp_path / "history"), *extra]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INJECTORS), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environ)


def test_a_slowed_combo_is_a_confirmed_regression_and_fails_the_run(tmp_path):
    for _ in range(2):  # history only: CPU noise between two plain runs is not what this test is about
        run_matrix(tmp_path, "--history-gate", "off")

    # +30 ms on steps of ~10-25 ms (2-4x slower): inside the CPU class's fixed speed limit (a quarter of the baseline),
    # so only the judgement against history can fail the run; far beyond the CPU's minimum effect (50 %), which the
    # unslowed bf16 combo's run-to-run swing (up to ±25 % on a shared 2-core runner) stays under.
    done = run_matrix(tmp_path, "-p", "slow_combo",
                      env={"FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]", "FLUXGATE_SLOW_DELAY_S": "0.03"})

    assert done.returncode == 1 and "2 passed" in done.stdout, done.stdout[-3000:]
    verdict_lines = [line.strip() for line in done.stdout.splitlines() if line.startswith("  flux1-dev[")]
    assert any(line.startswith("flux1-dev[nvfp4]: regression") and "confirmed by re-measurement" in line
               for line in verdict_lines), done.stdout[-3000:]
    assert not any(line.startswith("flux1-dev[bf16]: regression") for line in verdict_lines)
    newest = max((tmp_path / "history").glob("*.json"), key=lambda p: p.stat().st_mtime)
    outcomes = [(r["combo"], r["outcome"]) for r in json.loads(newest.read_text())["records"]]
    assert ("flux1-dev[nvfp4]", "remeasure") in outcomes


def test_with_the_history_gate_off_the_same_regression_is_reported_but_does_not_fail(tmp_path):
    for _ in range(2):
        run_matrix(tmp_path, "--history-gate", "off")

    # The same slowdown under a minimum effect larger than itself is no finding (the option reaches the rule).
    shutil.copytree(tmp_path / "history", tmp_path / "lenient" / "history")
    lenient = run_matrix(tmp_path / "lenient", "-p", "slow_combo", "--history-gate", "off", "--min-speed-effect", "900",
                         env={"FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]", "FLUXGATE_SLOW_DELAY_S": "0.03"})
    assert lenient.returncode == 0 and "flux1-dev[nvfp4]: regression" not in lenient.stdout, lenient.stdout[-3000:]

    done = run_matrix(tmp_path, "-p", "slow_combo", "--history-gate", "off",
                      env={"FLUXGATE_SLOW_COMBO": "flux1-dev[nvfp4]", "FLUXGATE_SLOW_DELAY_S": "0.03"})

    assert done.returncode == 0 and "advisory: --history-gate off" in done.stdout
    assert "flux1-dev[nvfp4]: regression" in done.stdout


def test_a_bad_minimum_effect_is_a_usage_error_naming_the_option(tmp_path):
    done = run_matrix(tmp_path, "--min-speed-effect", "two")
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--min-speed-effect 'two': expected 'auto' or a percentage > 0" in done.stderr
