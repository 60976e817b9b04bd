"""fluxgate.stats: the step-time summary a verdict rests on (median, IQR, low quantiles, robust CV)."""

import json
import math

import pytest

from fluxgate.stats import step_stats


def test_summary_of_known_step_times():
    stats = step_stats([0.5, 0.1, 0.4, 0.2, 0.3])

    assert stats.n == 5
    assert stats.median_s == pytest.approx(0.3)
    assert stats.iqr_s == pytest.approx(0.2)  # 0.4 - 0.2, linear interpolation as numpy/scipy
    assert stats.mean_s == pytest.approx(0.3)
    assert stats.std_s == pytest.approx(math.sqrt(0.025))  # sample std (ddof=1)
    assert stats.min_s == pytest.approx(0.1) and stats.max_s == pytest.approx(0.5)
    assert stats.p10_s == pytest.approx(0.14) and stats.p90_s == pytest.approx(0.46)
    assert stats.cv == pytest.approx(math.sqrt(0.025) / 0.3)
    assert stats.robust_cv == pytest.approx(0.2 / 1.349 / 0.3)
    assert stats.median_it_s == pytest.approx(1 / 0.3)


def test_one_slow_step_moves_the_cv_but_not_the_robust_cv():
    stats = step_stats([0.1] * 9 + [1.0])

    assert stats.median_s == pytest.approx(0.1) and stats.p10_s == pytest.approx(0.1)
    assert stats.robust_cv == pytest.approx(0.0)
    assert stats.cv > 1.0


def test_a_single_step_has_no_standard_deviation():
    stats = step_stats([0.25])

    assert stats.std_s is None and stats.cv is None
    assert stats.median_s == stats.min_s == stats.p10_s == 0.25
    assert stats.robust_cv == 0.0


@pytest.mark.parametrize("times", [[], [0.1, 0.0], [0.1, -0.2], [0.1, float("nan")], [float("inf")]])
def test_missing_or_impossible_step_times_are_refused(times):
    with pytest.raises(ValueError, match="step"):
        step_stats(times)


def test_json_holds_every_figure_as_plain_numbers():
    data = json.loads(json.dumps(step_stats([0.2, 0.21, 0.19]).to_json(), allow_nan=False))

    assert set(data) >= {"n", "median_s", "iqr_s", "mean_s", "std_s", "min_s", "p10_s", "cv", "robust_cv",
                         "median_it_s"}
    assert all(isinstance(value, (int, float)) for value in data.values())


def test_contention_is_the_median_share_of_a_step_spent_waiting_for_a_cpu():
    from fluxgate.stats import HOST_CONTENTION, contention_note, run_wait_share

    assert run_wait_share([0.1, 0.1, 0.3], [0.01, 0.02, 0.2]) == pytest.approx(0.2)
    assert run_wait_share([0.1], None) is None and run_wait_share([0.1, 0.1], [0.0]) is None
    assert contention_note([0.1] * 3, [0.1 * HOST_CONTENTION * 0.99] * 3) is None
    assert "waited for a CPU 30% of each step" in contention_note([0.1] * 3, [0.03] * 3)


def test_run_queue_wait_is_read_from_linux_schedstat_and_only_grows():
    from fluxgate.measuring.measure import run_queue_wait_s

    first = run_queue_wait_s()
    if first is None:
        pytest.skip("no /proc/thread-self/schedstat on this kernel")
    sum(range(200_000))
    assert run_queue_wait_s() >= first
