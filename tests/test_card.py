"""fluxgate.showing.card: A/A false alarms and detection of injected slowdowns, from recorded runs."""

from __future__ import annotations

import numpy as np

from fluxgate.showing import card
from fluxgate.storing.record import PASSED, Metrics, Record


def record(run: int, steps: list[float], combo="flux1-dev[bf16]"):
    return Record(combo=combo, run_id=f"run{run}", recorded=f"2026-11-30T00:0{run}:00+00:00",
                  gpu_class="nvidia-h200", profile="synthetic", settings={}, outcome=PASSED,
                  environment={"gpu": {"uuid": f"GPU-{run}"}}, metrics=Metrics(step_times_s=steps))


def test_steady_runs_raise_no_false_alarm_and_a_3_percent_slowdown_is_seen():
    rng = np.random.default_rng(0)
    runs = [record(i, list(0.175 * (1 + rng.normal(0, 0.002, 27)))) for i in range(4)]
    (row,) = card.build(runs, "nvidia-h200")
    assert row.comparisons == 4 and row.false_alarms == 0
    assert row.detected[0.03] == 4


def test_a_machine_slower_than_the_rest_is_a_false_alarm_on_the_card():
    rng = np.random.default_rng(1)
    runs = [record(i, list(0.175 * (1 + rng.normal(0, 0.002, 27)))) for i in range(3)]
    runs.append(record(3, list(0.175 * 1.04 * (1 + rng.normal(0, 0.002, 27)))))  # one machine 4 % slower
    (row,) = card.build(runs, "nvidia-h200")
    assert row.false_alarms >= 1


def test_a_fixed_limit_counts_too_and_the_markdown_states_the_counts():
    runs = [record(i, [0.2] * 27) for i in range(3)]
    thresholds = {"flux1-dev": {"bf16": {"min_it_s": 5.5, "speed_statistic": "p10"}}}  # 5.0 it/s measured
    (row,) = card.build(runs, "nvidia-h200", thresholds)
    assert row.false_alarms == 3
    text = card.markdown([row], "nvidia-h200", runs=3)
    assert "**3 of 3** comparisons" in text and "| `flux1-dev[bf16]` | 3 | 3/3 |" in text
