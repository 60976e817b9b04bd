"""fluxgate.judging.spread: speed limits from the spread of several runs on several GPUs of a class."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fluxgate.judging import spread
from fluxgate.judging.baselines import Baseline, Thresholds
from fluxgate.judging.compare import expected_range
from fluxgate.storing.local import load_paths
from fluxgate.storing.record import PASSED, Metrics, Record


def record(run: str, gpu: str, step_s: float, combo="flux1-dev[bf16]", syncs=0, **extra):
    return Record(combo=combo, run_id=run, gpu_class="nvidia-h200", outcome=PASSED,
                  environment={"gpu": {"uuid": gpu}},
                  metrics=Metrics(step_times_s=[step_s] * 27, kernel_path={"host_syncs_per_step": syncs}, **extra))


def test_the_margin_is_z_sigma_from_the_range_of_the_runs_with_a_floor():
    runs = [record("a", "GPU-1", 0.170), record("b", "GPU-2", 0.175), record("c", "GPU-2", 0.180)]
    (limit,) = spread.derive(runs, "nvidia-h200").values()
    values = [1 / 0.170, 1 / 0.175, 1 / 0.180]
    sigma = (max(values) - min(values)) / expected_range(3)
    assert limit.center_it_s == pytest.approx(1 / 0.175)
    assert limit.margin == pytest.approx(spread.Z * sigma / limit.center_it_s)
    assert limit.min_it_s == pytest.approx(limit.center_it_s * (1 - limit.margin))
    assert min(values) > limit.min_it_s  # never tighter than the runs it came from
    assert limit.gpus == ("GPU-1", "GPU-2") and "3 runs on 2 GPUs" in limit.derivation
    steady = [record(r, g, 0.175) for r, g in (("a", "GPU-1"), ("b", "GPU-2"), ("c", "GPU-2"))]
    assert spread.derive(steady, "nvidia-h200")["flux1-dev[bf16]"].margin == spread.MIN_MARGIN


def test_a_host_synchronous_combo_keeps_the_larger_floor():
    runs = [record(r, g, 0.4, combo="flux1-dev[nvfp4]", syncs=494) for r, g in (("a", "1"), ("b", "2"), ("c", "2"))]
    limit = spread.derive(runs, "nvidia-h200")["flux1-dev[nvfp4]"]
    assert limit.margin == 0.15 and "host-synchronous" in limit.derivation


def test_one_gpu_or_too_few_runs_or_contended_runs_are_not_enough():
    one_gpu = [record(r, "GPU-1", 0.175) for r in "abc"]
    with pytest.raises(ValueError, match=r"flux1-dev\[bf16\] \(3 runs, 1 GPUs\)"):
        spread.derive(one_gpu, "nvidia-h200")
    contended = [record("a", "GPU-1", 0.175), record("b", "GPU-2", 0.175),
                 record("c", "GPU-2", 0.5, run_wait_s=[0.3] * 27)]
    with pytest.raises(ValueError, match="2 runs, 2 GPUs"):
        spread.derive(contended, "nvidia-h200")


def test_the_speed_limit_compares_the_statistic_it_was_derived_for(tmp_path):
    from fluxgate.gate import limit_failures
    from fluxgate.judging.similarity import Similarity, summarise
    from fluxgate.measuring.measure import Measurement

    # Host jitter: half the steps slow, the fast steps unchanged. The median falls below the limit, the p10 does not.
    steps = [0.100] * 13 + [0.130] * 14
    result = Measurement(steps, 3.0, 1.0, "cuda_max_allocated", 1.0, None)
    similar = summarise({"fox": Similarity(1.0, float("inf"))})
    for statistic, fails in (("median", True), ("p10", False)):
        baseline = Baseline(tmp_path, Thresholds(9.0, 2.0, 0.9, 20.0, speed_statistic=statistic), tmp_path / "flux1-dev")
        failures = limit_failures(result, similar, baseline, "[flux1-dev.bf16]")
        assert bool(failures) is fails, failures
    assert "it/s (p10 step) < min" in limit_failures(
        Measurement([0.2] * 27, 3.0, 1.0, "cuda_max_allocated", 1.0, None), similar,
        Baseline(tmp_path, Thresholds(9.0, 2.0, 0.9, 20.0, speed_statistic="p10"), tmp_path / "flux1-dev"), "e")[0]


def test_the_committed_h200_limits_pass_every_run_they_came_from():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "baselines" / "nvidia-h200"
    limits = spread.derive(load_paths([root / "runs"]), "nvidia-h200")
    assert len(limits) == 16
    for limit in limits.values():
        assert min(limit.values_it_s) >= limit.min_it_s and len(limit.gpus) >= 2


def test_an_outlier_run_or_mixed_settings_make_no_limit():
    outlier = [record("a", "GPU-1", 0.1), record("b", "GPU-2", 0.1), record("c", "GPU-2", 0.2)]
    with pytest.raises(ValueError, match=r"runs too far apart for a speed limit .* margin \d+% > 25%"):
        spread.derive(outlier, "nvidia-h200")
    mixed = [record("a", "GPU-1", 0.175), record("b", "GPU-2", 0.175), record("c", "GPU-2", 0.175)]
    mixed[2] = replace(mixed[2], settings={"steps": 4})
    with pytest.raises(ValueError, match=r"other profiles or image settings mixed in for flux1-dev\[bf16\]"):
        spread.derive(mixed, "nvidia-h200")


def test_the_thresholds_command_derives_each_part_on_its_own(tmp_path, capsys):
    import shutil
    import tomllib
    from pathlib import Path

    from fluxgate import thresholds

    root = Path(__file__).resolve().parents[1] / "baselines" / "nvidia-h200"
    tmp_class = tmp_path / "nvidia-h200"
    tmp_class.mkdir()
    shutil.copy(root / "thresholds.toml", tmp_class / "thresholds.toml")
    before = (tmp_class / "thresholds.toml").read_text()
    args = ["--gpu-class", "nvidia-h200", "--baselines-dir", str(tmp_path)]
    assert thresholds.main([str(root / "runs"), *args]) == 0  # print only
    out = capsys.readouterr().out
    assert "speed limits (p10" in out and "noise floors" in out and "trade-offs against bf16" in out
    assert "eager fp8-scaled flux1-dev runs at 0.70x bf16's speed" in out
    assert (tmp_class / "thresholds.toml").read_text() == before
    # One run: too few for speed limits; the noise floor and trade-offs are still derived and written
    one = sorted((root / "runs").glob("*.json"))[0]
    assert thresholds.main([str(one), *args, "--write"]) == 2
    captured = capsys.readouterr()
    (error,) = captured.err.splitlines()
    assert error.startswith("fluxgate.thresholds: error: speed: nvidia-h200: too few runs")
    assert "ONE run on one machine" in captured.out and "wrote" in captured.out and "not speed" in captured.out
    written = tomllib.loads((tmp_class / "thresholds.toml").read_text())
    assert written["noise_floor"]["flux1-dev"]["runs"] == [one.stem]
    assert written["tradeoffs"]["flux2-dev"]["nvfp4"]["max_mem_ratio"] > 0.358
    assert written["flux1-dev"]["bf16"]["speed_runs"] == tomllib.loads(before)["flux1-dev"]["bf16"]["speed_runs"]
    assert thresholds.main([str(one), *args, "--parts", "quality"]) == 0
    with pytest.raises(SystemExit):
        thresholds.main([str(one), *args, "--parts", "memory"])


def test_a_speed_limit_missed_under_host_contention_is_not_judged_on_cpu_and_named_on_a_gpu(tmp_path):
    """Issue 31: a busy laptop's quick start does not fail on speed; the miss is reported as not judged, with the
    contention that caused it. Without a `not_judged` list (a GPU run, which re-measures instead) it fails, naming
    the contention. A limit met under contention is met, and a miss without contention fails either way."""
    from fluxgate.gate import limit_failures
    from fluxgate.judging.similarity import Similarity, summarise
    from fluxgate.measuring.measure import Measurement

    similar = summarise({"fox": Similarity(1.0, float("inf"))})
    baseline = Baseline(tmp_path, Thresholds(9.0, 2.0, 0.9, 20.0), tmp_path / "flux1-dev")
    contended = Measurement([0.2] * 8, 3.0, 1.0, "process_rss_peak", None, None, run_wait_s=[0.08] * 8)
    not_judged = []
    assert limit_failures(contended, similar, baseline, "e", not_judged) == []
    assert len(not_judged) == 1 and "5.000 it/s < min 9.000 it/s" in not_judged[0]
    assert "not judged, host contention: the main thread waited for a CPU 40% of each step" in not_judged[0]
    (line,) = limit_failures(contended, similar, baseline, "e")
    assert line.startswith("speed: 5.000 it/s") and "host contention" in line and "not necessarily the code" in line
    quiet = Measurement([0.2] * 8, 3.0, 1.0, "process_rss_peak", None, None, run_wait_s=[0.001] * 8)
    not_judged = []
    assert limit_failures(quiet, similar, baseline, "e", not_judged) and not not_judged
    fast = Measurement([0.1] * 8, 3.0, 1.0, "process_rss_peak", None, None, run_wait_s=[0.08] * 8)
    assert limit_failures(fast, similar, baseline, "e", not_judged) == [] and not not_judged


def test_on_a_gpu_a_contended_miss_is_measured_again_and_judged_only_uncontended(tmp_path):
    """Gate._contended_speed: the re-measurement's steps decide when they ran uncontended (a pass drops the miss, a
    miss stays, saying why it was re-measured); contended again, the combo fails as invalid, not on speed."""
    from fluxgate.gate import Gate, Outcome
    from fluxgate.matrix import Combo
    from fluxgate.measuring.measure import Measurement

    baseline = Baseline(tmp_path, Thresholds(9.0, 2.0, 0.9, 20.0), tmp_path / "flux1-dev")
    contended = Measurement([0.2] * 8, 3.0, 1.0, "cuda_max_allocated", 1.0, None, run_wait_s=[0.08] * 8)

    def judged(again: Measurement) -> list[str]:
        gate = Gate.__new__(Gate)
        gate.runner = type("R", (), {"measure": lambda self, combo: (again, {})})()
        outcome = Outcome(Combo("flux1-dev", "bf16"), failures=["memory: ..."])  # the miss itself: not judged
        gate._contended_speed(Combo("flux1-dev", "bf16"), baseline, "e", outcome)
        return outcome.failures

    assert judged(Measurement([0.1] * 8, 3.0, 1.0, "cuda_max_allocated", 1.0, None, run_wait_s=[0.0] * 8)) == \
        ["memory: ..."]
    slow = judged(Measurement([0.2] * 8, 3.0, 1.0, "cuda_max_allocated", 1.0, None, run_wait_s=[0.0] * 8))
    assert slow[1].startswith("speed: 5.000 it/s") and "re-measured: the first measurement was under host" in slow[1]
    invalid = judged(contended)
    assert invalid[1].startswith("invalid: host contention in the measurement and its re-measurement")


def test_a_missed_memory_limit_names_value_limit_and_where_it_comes_from(tmp_path):
    from fluxgate.gate import limit_failures
    from fluxgate.judging.similarity import Similarity, summarise
    from fluxgate.measuring.measure import Measurement

    baseline = Baseline(tmp_path, Thresholds(1.0, 2.0, 0.9, 20.0), tmp_path / "flux1-dev")
    heavy = Measurement([0.2] * 8, 3.0, 2.5, "cuda_max_allocated", 2.6, None)
    (line,) = limit_failures(heavy, summarise({"fox": Similarity(1.0, float("inf"))}), baseline, '["m"."bf16"]')
    assert line == f'memory: peak 2.500 GiB (cuda_max_allocated) > max 2.000 GiB ({tmp_path}/thresholds.toml ["m"."bf16"])'
