"""Compile time's own bound (issue 29: "compile time is measured apart and has its own bound"): written with the
baselines, derived from runs by `fluxgate thresholds --parts compile`, judged beside the speed limit."""

from __future__ import annotations

import json

import pytest

from PIL import Image

from fluxgate import thresholds
from fluxgate.gate import limit_failures
from fluxgate.judging import baselines, compile_time
from fluxgate.judging.baselines import Measured
from fluxgate.judging.similarity import Similarity, summarise
from fluxgate.matrix import Combo
from fluxgate.measuring.measure import Measurement
from fluxgate.storing.record import FAILED, PASSED, Metrics, Record

COMPILED, EAGER = Combo.parse("flux1-dev[fp8-scaled-compile]"), Combo.parse("flux1-dev[fp8-scaled]")
SETTINGS = {"profile": "tiny", "steps": 4}


def test_the_bound_is_twice_the_slowest_compile_and_at_least_a_minute_above_it():
    assert compile_time.bound(14.0) == 74.0  # warm-cache compiles must not make a cold cache fail
    assert compile_time.bound(200.0) == 400.0
    assert compile_time.bound(10.0, margin=0.5, slack_s=5.0) == 15.0


def _result(compile_s):
    return Measurement([0.1] * 8, 1.0, 1.0, "cuda_max_allocated", 1.0, None, compile_s=compile_s)


def test_a_compile_over_its_bound_fails_naming_value_bound_and_entry(tmp_path):
    baselines.write(tmp_path, "cpu", [Measured(COMPILED, 10.0, 1.0, 0.999, 45.0, compile_s=14.0),
                                      Measured(EAGER, 8.0, 1.0, 0.999, 45.0)],
                    {"flux1-dev": {"fox": Image.new("RGB", (8, 8))}}, {"models": {"flux1-dev": SETTINGS}})
    compiled = baselines.load(tmp_path, "cpu", COMPILED, SETTINGS)
    assert compiled.thresholds.max_compile_s == 74.0
    assert baselines.load(tmp_path, "cpu", EAGER, SETTINGS).thresholds.max_compile_s is None
    similar = summarise({"fox": Similarity(1.0, float("inf"))})
    assert limit_failures(_result(70.0), similar, compiled, "[e]") == []
    (line,) = limit_failures(_result(200.0), similar, compiled, '["flux1-dev"."fp8-scaled-compile"]')
    assert line == (f"compile time: 200.0 s > max 74.0 s ({tmp_path}/cpu/thresholds.toml "
                    '["flux1-dev"."fp8-scaled-compile"])')
    assert limit_failures(_result(None), similar, compiled, "[e]") == []  # not compiled: nothing to judge


def _record(run: str, combo: str, compile_s, gpu_class="nvidia-h200", failures=None, profile=None, **env) -> Record:
    return Record(combo=combo, run_id=run, gpu_class=gpu_class, outcome=FAILED if failures else PASSED,
                  environment=env, failures=failures, profile=profile,
                  metrics=Metrics(step_times_s=[0.1] * 4, compile_s=compile_s))


def test_the_derived_bound_rests_on_the_slowest_compile_of_one_sided_runs_of_the_class():
    records = [_record("r1", COMPILED.id, 14.0), _record("r2", COMPILED.id, 21.0), _record("r3", EAGER.id, None),
               _record("r4", COMPILED.id, 500.0, gpu_class="nvidia-h100-80gb-hbm3"),
               _record("r5", COMPILED.id, 500.0, ab_run="x"), _record("r6", COMPILED.id, float("nan")),
               _record("r7", COMPILED.id, 1e308), _record("r8", COMPILED.id, -5.0),
               _record("r9", COMPILED.id, 300.0, failures=["compile time: 300.0 s > max 74.0 s (x)"])]
    (limit,) = compile_time.derive(records, "nvidia-h200").values()
    assert (limit.combo, limit.max_compile_s, limit.run_ids) == (COMPILED.id, 81.0, ("r1", "r2"))
    assert limit.derivation == "slowest compile of 2 runs 21.0 s (fastest 14.0 s); bound max(2x, +60 s)"
    assert compile_time.derive(records, "nvidia-h200", {"compile": 3.0, "compile_slack_s": 0})[COMPILED.id] \
        .max_compile_s == 84.0  # a thresholds file's own margins
    assert compile_time.derive(records[2:3], "nvidia-h200") == {}  # an eager-only class: nothing to bound


def test_the_thresholds_command_writes_the_compile_part_and_names_combos_without_an_entry(tmp_path, capsys):
    baselines.write(tmp_path, "nvidia-h200", [Measured(COMPILED, 10.0, 1.0, 0.999, 45.0, compile_s=5.0)],
                    {"flux1-dev": {"fox": Image.new("RGB", (8, 8))}}, {"models": {"flux1-dev": SETTINGS}})
    runs = tmp_path / "runs"
    runs.mkdir()
    for run, combo, compile_s in (("20261201T000000Z-aaaaaa", COMPILED.id, 30.0),
                                  ("20261201T000001Z-bbbbbb", "z-image-turbo[bf16-compile]", 9.0)):
        (runs / f"{run}.json").write_text(
            json.dumps({"schema": 1, "run_id": run, "environment": {},
                        "records": [_record(run, combo, compile_s).to_json()]}))
    status = thresholds.main([str(runs), "--gpu-class", "nvidia-h200", "--baselines-dir", str(tmp_path),
                              "--parts", "compile", "--write"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "flux1-dev[fp8-scaled-compile]: max 90.0 s" in out
    assert "z-image-turbo[bf16-compile]: no entry in" in out
    assert baselines.read_thresholds(tmp_path, "nvidia-h200", COMPILED).max_compile_s == 90.0
    assert "# max_compile_s: the compile-time bound" in (tmp_path / "nvidia-h200/thresholds.toml").read_text()


@pytest.mark.parametrize("margins, problem", [({"compile": float("nan")}, "compile = nan"),
                                              ({"compile_slack_s": -60}, "compile_slack_s = -60"),
                                              ({"compile": "2x"}, "compile = '2x'")])
def test_margins_that_are_not_finite_numbers_at_least_0_are_refused_naming_the_key(tmp_path, margins, problem):
    with pytest.raises(ValueError, match=f"\\[margins\\] {problem}: want a finite number >= 0"):
        compile_time.derive([_record("r1", COMPILED.id, 14.0)], "nvidia-h200", margins)
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "thresholds.toml").write_text("[margins]\n" + "".join(
        f"{key} = {value!r}\n".replace("nan", "nan").replace("'", '"') for key, value in margins.items()))
    with pytest.raises(baselines.BaselineError, match=f"thresholds.toml: \\[margins\\] {problem.split(' =')[0]}"):
        baselines.write(tmp_path, "cpu", [Measured(COMPILED, 10.0, 1.0, 0.999, 45.0, compile_s=14.0)], {},
                        {"models": {}})


def test_a_bound_that_is_not_above_0_is_refused_and_mixed_profiles_derive_nothing(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "thresholds.toml").write_text('[flux1-dev.fp8-scaled-compile]\nmin_it_s = 1.0\nmax_peak_mem_gib = 1.0\n'
                                            'min_ms_ssim = 0.9\nmin_psnr_db = 30.0\nmax_compile_s = -1.0\n')
    with pytest.raises(baselines.BaselineError, match="max_compile_s -1.0: a compile-time bound is a number of "
                                                      "seconds above 0"):
        baselines.read_thresholds(tmp_path, "cpu", COMPILED)
    with pytest.raises(ValueError, match="runs of several profiles mixed in for flux1-dev\\[fp8-scaled-compile\\]"):
        compile_time.derive([_record("r1", COMPILED.id, 14.0, profile="tiny"),
                             _record("r2", COMPILED.id, 14.0, profile="synthetic")], "nvidia-h200")


def test_a_slow_compile_under_host_contention_is_not_judged_on_cpu_and_named_on_a_gpu(tmp_path):
    baselines.write(tmp_path, "cpu", [Measured(COMPILED, 10.0, 1.0, 0.999, 45.0, compile_s=14.0)],
                    {"flux1-dev": {"fox": Image.new("RGB", (8, 8))}}, {"models": {"flux1-dev": SETTINGS}})
    compiled = baselines.load(tmp_path, "cpu", COMPILED, SETTINGS)
    contended = Measurement([0.1] * 8, 1.0, 1.0, "rss", 1.0, None, compile_s=200.0, run_wait_s=[0.05] * 8)
    similar = summarise({"fox": Similarity(1.0, float("inf"))})
    not_judged: list[str] = []
    assert limit_failures(contended, similar, compiled, "[e]", not_judged) == []
    assert len(not_judged) == 1 and not_judged[0].startswith("compile time: 200.0 s > max 74.0 s")
    (line,) = limit_failures(contended, similar, compiled, "[e]")  # a GPU run: failed, naming the contention
    assert line.startswith("compile time: 200.0 s") and "not necessarily the code" in line
