"""fluxgate.judging.compare: regression verdicts against history that flag real shifts and stay quiet on run-to-run noise."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxgate.judging.compare import (
    IMPROVEMENT,
    NO_CHANGE,
    NOT_COMPARABLE,
    REGRESSION,
    REMEASURE,
    UNEXPLAINED_IMPROVEMENT,
    Policy,
    compare_run,
    memory_verdict,
    select_window,
    similarity_verdict,
    speed_verdict,
)
from fluxgate.judging.confirm import confirm
from fluxgate.storing.record import ERROR, PASSED, SKIPPED, Metrics, Record

ENVIRONMENT = {"torch": "2.11.0+cu130", "diffusers": "0.42.1", "cuda": "13.0", "device_name": "NVIDIA H100 80GB HBM3",
               "compute_capability": "9.0", "gpu_class": "nvidia-h100-80gb-hbm3", "git_commit": "a" * 40,
               "cuda_alloc_conf": "expandable_segments:True",
               "git_dirty": False, "gpu": {"driver_version": "580.159.04", "power_limit_w": 700.0}}
SETTINGS = {"seed": 0, "steps": 28, "size_px": 1024, "guidance_scale": 3.5, "prompt": "a red fox",
            "profile": "synthetic"}
FAST = settings(max_examples=40, deadline=None)


def step_times(rng, slowdown=0.0, offset=0.009, median_s=0.18, cv=0.015, steps=28):
    """One simulated run on the H100: lognormal steps (CV 1.5 %, AR(1) 0.3 within the run), a per-process offset
    uniform in +-`offset`, and 5 % of steps slowed by 3-10 %."""
    phi = 0.3
    log_noise = np.empty(steps)
    log_noise[0] = rng.normal(0, cv)
    for i in range(1, steps):
        log_noise[i] = phi * log_noise[i - 1] + rng.normal(0, cv * np.sqrt(1 - phi**2))
    spikes = np.where(rng.random(steps) < 0.05, 1 + rng.uniform(0.03, 0.10, steps), 1.0)
    process = 1 + rng.uniform(-offset, offset)
    return (median_s * (1 + slowdown) * process * np.exp(log_noise) * spikes).tolist()


def record(index, steps, combo="flux1-dev[bf16]", mem_gib=24.75, ms_ssim=1.0, outcome=PASSED, environment=None,
           **fields):
    model, precision = combo.rstrip("]").split("[")
    fields = {"profile": "synthetic", "gpu_class": "nvidia-h100-80gb-hbm3", "settings": SETTINGS, **fields}
    return Record(run_id=f"20261124T01{index:02d}00Z-run{index:02d}", recorded=f"2026-11-24T01:{index:02d}:30+00:00",
                  combo=combo, model=model, precision=precision, outcome=outcome,
                  metrics=Metrics(step_times_s=list(steps), peak_mem_gib=mem_gib, ms_ssim=ms_ssim),
                  environment=ENVIRONMENT if environment is None else environment, **fields)


def with_metrics(entry: Record, **values) -> Record:
    return replace(entry, metrics=replace(entry.metrics, **values))


def outcomes(verdicts):
    return {v.combo: v.outcome for v in verdicts}


positive_steps = st.lists(st.floats(0.1, 0.11, allow_nan=False), min_size=5, max_size=40)


@FAST
@given(positive_steps, st.integers(1, 4))
def test_identical_step_times_are_never_a_change(steps, copies):
    history = [record(i, steps) for i in range(copies)] + [record(9, steps)]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == NO_CHANGE, verdict.message
    assert verdict.metric("step_time_s").effect_size == 0


def test_a_3_percent_slowdown_against_two_normal_runs_is_a_regression_of_that_combo_only():
    rng = np.random.default_rng(3)
    combos = ["flux1-dev[bf16]", "flux1-dev[nvfp4]"]
    history = [record(i, step_times(rng), combo) for i in range(2) for combo in combos]
    history += [record(5, step_times(rng), "flux1-dev[bf16]"), record(5, step_times(rng, 0.03), "flux1-dev[nvfp4]")]
    verdicts = compare_run(history, history[-1].run_id)
    assert outcomes(verdicts) == {"flux1-dev[bf16]": NO_CHANGE, "flux1-dev[nvfp4]": REGRESSION}
    slow = verdicts[1].metric("step_time_s")
    assert slow.relative_delta > 0.02 and slow.p_value < 0.01 and "regression: +" in verdicts[1].message


def test_ten_aa_runs_with_per_process_offsets_raise_no_false_alarm():
    rng = np.random.default_rng(20261124)
    history = [record(i, step_times(rng)) for i in range(10)]
    verdicts = [v for r in history[1:] for v in compare_run(history, r.run_id)]
    assert [v.outcome for v in verdicts] == [NO_CHANGE] * 9, [v.message for v in verdicts]


def test_a_process_offset_that_the_rank_test_calls_significant_is_not_a_regression():
    rng = np.random.default_rng(1)
    base = step_times(rng, offset=0)
    verdict = speed_verdict([t * 1.015 for t in base], [base])
    assert verdict.p_value < 1e-3 and verdict.outcome == NO_CHANGE  # 1.5 %: below the 2 % minimum effect


def test_a_candidate_inside_the_windows_own_run_to_run_spread_is_not_a_regression():
    rng = np.random.default_rng(2)
    base = step_times(rng, offset=0)
    window = [base, [t * 1.05 for t in base]]  # a noisy combo: its runs differ by 5 %
    assert speed_verdict([t * 1.04 for t in base], window).outcome == NO_CHANGE
    assert speed_verdict([t * 1.12 for t in base], window).outcome == REGRESSION


@FAST
@given(st.data(), st.sampled_from([1.25, 1.6]), st.integers(1, 3))
def test_a_large_shift_is_always_flagged_regardless_of_the_sample_values(data, factor, runs):
    window = [data.draw(positive_steps) for _ in range(runs)]
    candidate = data.draw(positive_steps)
    assert speed_verdict([t * factor for t in candidate], window).outcome == REGRESSION
    assert speed_verdict([t / factor for t in candidate], window).outcome == UNEXPLAINED_IMPROVEMENT


def test_a_moderate_speed_up_is_an_improvement_and_a_big_one_asks_for_a_check():
    rng = np.random.default_rng(4)
    window = [step_times(rng, offset=0) for _ in range(2)]
    assert speed_verdict(step_times(rng, -0.05, offset=0), window).outcome == IMPROVEMENT
    assert speed_verdict(step_times(rng, -0.20, offset=0), window).outcome == UNEXPLAINED_IMPROVEMENT


@FAST
@given(st.randoms(use_true_random=False))
def test_order_of_samples_and_records_does_not_change_the_verdicts(random):
    rng = np.random.default_rng(5)
    history = [record(i, step_times(rng, 0.03 if i == 3 else 0.0), combo)
               for i in range(4) for combo in ("flux1-dev[bf16]", "flux2-dev[bf16]")]
    shuffled = [with_metrics(r, step_times_s=random.sample(r.metrics.step_times_s, 28))
                for r in random.sample(history, len(history))]
    run_id = history[-1].run_id
    assert compare_run(shuffled, run_id) == compare_run(history, run_id)


@pytest.mark.parametrize(("path", "new", "named"), [
    (("torch",), "2.12.0+cu130", "torch 2.11.0+cu130 -> 2.12.0+cu130"),
    (("gpu", "driver_version"), "590.10", "driver_version 580.159.04 -> 590.10"),
    (("gpu", "power_limit_w"), 500.0, "power_limit_w 700.0 -> 500.0"),
    (("compute_capability",), "9.0a", "compute_capability 9.0 -> 9.0a"),
    (("cuda_alloc_conf",), "default", "cuda_alloc_conf expandable_segments:True -> default"),
    (("step_timing",), "first-step-apart", "step_timing absent -> first-step-apart"),
    (("cupti_teardown",), True, "cupti_teardown False -> True"),
])
def test_a_fingerprint_difference_is_not_comparable_and_names_the_field(path, new, named):
    environment = {**ENVIRONMENT, "gpu": dict(ENVIRONMENT["gpu"])}
    (environment if len(path) == 1 else environment["gpu"])[path[-1]] = new
    history = [record(0, [0.18] * 28), record(1, [0.18] * 28, environment=environment)]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == NOT_COMPARABLE and named in verdict.reason and named in verdict.message


def test_ignore_fields_compares_across_a_deliberate_upgrade_and_notes_it():
    upgraded = {**ENVIRONMENT, "torch": "2.12.0+cu130"}
    history = [record(0, [0.18] * 28), record(1, [0.18 * 1.05] * 28, environment=upgraded)]
    (verdict,) = compare_run(history, history[-1].run_id, ignore_fields=["torch"])
    assert verdict.outcome == REGRESSION
    assert verdict.notes == ("ignored torch 2.11.0+cu130 -> 2.12.0+cu130",)
    with pytest.raises(ValueError, match="tourch"):
        compare_run(history, history[-1].run_id, ignore_fields=["tourch"])


def test_no_earlier_runs_is_not_comparable_naming_the_gpu_class():
    history = [record(0, [0.18] * 28, combo="flux2-dev[nvfp4]"), record(1, [0.18] * 28)]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == NOT_COMPARABLE
    assert verdict.reason.startswith("no earlier runs of flux1-dev[bf16] on nvidia-h100-80gb-hbm3")


def test_a_candidate_that_errored_is_not_comparable():
    history = [record(0, [0.18] * 28), record(1, [], outcome=ERROR, error="corrupt checkpoint x.gguf")]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == NOT_COMPARABLE and "corrupt checkpoint x.gguf" in verdict.reason


@pytest.mark.parametrize(("window", "candidate", "expected"), [
    ([24.75, 24.74], 24.75 * 1.03, REGRESSION),  # +3 % and +0.74 GiB over the max
    ([24.75, 24.74], 24.75 * 1.015, NO_CHANGE),  # +1.5 %: inside 2 %
    ([8.9], 9.12, NO_CHANGE),  # +2.5 % but only 0.22 GiB: inside 0.25 GiB
    ([0.05], 0.08, NO_CHANGE),  # +60 % of a tiny model is 0.03 GiB
    ([24.75], 24.75 * 0.95, IMPROVEMENT),
    ([24.75], 24.75 * 0.80, UNEXPLAINED_IMPROVEMENT),
])
def test_memory_flags_only_beyond_the_window_by_both_tolerances(window, candidate, expected):
    assert memory_verdict(candidate, window).outcome == expected


@pytest.mark.parametrize(("candidate", "expected"), [
    (0.9770, REGRESSION), (0.9790, NO_CHANGE), (0.9830, NO_CHANGE), (0.9860, IMPROVEMENT)])
def test_similarity_flags_only_beyond_the_window_by_the_tolerance(candidate, expected):
    assert similarity_verdict(candidate, [0.9801, 0.9815]).outcome == expected


def test_similarity_and_memory_regressions_reach_the_combo_verdict():
    history = [record(0, [0.18] * 28, ms_ssim=0.98), record(1, [0.18] * 28, ms_ssim=0.95)]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == REGRESSION and "ms_ssim regression: 0.9500 vs window 0.9800" in verdict.message
    assert compare_run(history, history[-1].run_id, policy=Policy(similarity_tolerance=0.05))[0].outcome == NO_CHANGE


def test_window_is_the_last_n_earlier_usable_runs_of_the_same_measurement():
    steps = [0.18] * 28
    history = [record(i, steps) for i in range(6)]
    history[4] = replace(history[4], outcome=ERROR)
    history += [record(6, steps, outcome=SKIPPED), record(6, steps, profile="real"),
                record(6, steps, combo="flux1-dev[nvfp4]"), record(6, steps, gpu_class="cpu"),
                record(6, steps, settings={**SETTINGS, "steps": 4}), record(9, steps)]  # 9: later than the candidate
    candidate = record(8, steps)
    window = select_window(history + [candidate], candidate, last_n=3)
    assert [r.run_id[-5:] for r in window] == ["run02", "run03", "run05"]
    assert [r.run_id[-5:] for r in select_window(history, candidate, last_n=1)] == ["run05"]


def test_window_of_a_base_commit_holds_its_clean_runs_only():
    steps = [0.18] * 28
    base = {**ENVIRONMENT, "git_commit": "b" * 40}
    history = [record(0, steps), record(1, steps, environment=base), record(2, steps),
               record(3, steps, environment={**base, "git_dirty": True}), record(4, steps, environment=base)]
    candidate = record(3, steps)  # base runs before and after it count
    window = select_window(history, candidate, base_commit="bbbbbbb")
    assert [r.run_id[-5:] for r in window] == ["run01", "run04"]
    own = record(4, steps, environment=base)  # a candidate at the base commit is not its own baseline
    assert [r.run_id[-5:] for r in select_window(history, own, base_commit="b" * 40)] == ["run01"]
    with pytest.raises(ValueError, match="4 hex digits"):
        select_window(history, candidate, base_commit="")


def test_confirm_keeps_a_regression_only_when_the_remeasurement_shows_it_too():
    rng = np.random.default_rng(6)
    history = [record(0, step_times(rng)), record(1, step_times(rng)), record(2, step_times(rng, 0.05))]
    (first,) = compare_run(history, history[-1].run_id)
    assert first.outcome == REGRESSION
    confirmed = confirm(first, step_times(rng, 0.05))
    assert confirmed.outcome == REGRESSION and "confirmed by re-measurement" in confirmed.message
    speed = confirmed.metric("step_time_s")
    assert speed.p_value >= first.metric("step_time_s").p_value
    not_again = confirm(first, step_times(rng))
    assert not_again.outcome == NO_CHANGE and "not confirmed" in not_again.message
    interleaved_base = [step_times(rng, 0.05), step_times(rng, 0.05)]  # the base got slower too: the machine did
    assert confirm(first, step_times(rng, 0.05), interleaved_base).outcome == NO_CHANGE


def test_speed_not_judged_leaves_the_other_metrics_judged():
    from fluxgate.judging.confirm import speed_not_judged

    rng = np.random.default_rng(6)
    history = [record(0, step_times(rng)), record(1, step_times(rng)), record(2, step_times(rng, 0.05))]
    (first,) = compare_run(history, history[-1].run_id)
    unjudged = speed_not_judged(first, "host contention: 40 %")
    assert first.outcome == REGRESSION and unjudged.outcome == NO_CHANGE
    assert unjudged.metric("step_time_s").message.startswith("not judged: host contention: 40 %")
    assert unjudged.metric("peak_mem_gib") == first.metric("peak_mem_gib") and not unjudged.stored(True).fails_run


def test_the_whole_image_time_is_judged_against_the_window_and_confirmed_by_the_re_measurement():
    """Issue 31: a VAE decode 30 % slower leaves the steps alone and moves the image (e2e_s): a regression beyond
    the window's slowest run and its own range, kept only if the re-measurement's image is one too."""
    from fluxgate.judging.compare import image_time_verdict

    assert image_time_verdict(3.30, [3.00, 3.03]).outcome == REGRESSION
    assert image_time_verdict(3.06, [3.00, 3.03]).outcome == NO_CHANGE  # within 2 % of the slowest run
    assert image_time_verdict(3.30, [2.90, 3.20]).outcome == NO_CHANGE  # within the window's own 10 % range
    assert image_time_verdict(None, [3.0]).outcome == NOT_COMPARABLE
    rng = np.random.default_rng(6)
    history = [with_metrics(record(i, step_times(rng)), e2e_s=e2e) for i, e2e in enumerate((3.00, 3.02, 3.90))]
    (first,) = compare_run(history, history[-1].run_id)
    assert first.metric("step_time_s").outcome == NO_CHANGE and first.metric("image_s").outcome == REGRESSION
    assert first.outcome == REGRESSION and "s per image vs window 3.000-3.020 s" in first.message
    assert confirm(first, step_times(rng), remeasured_e2e_s=3.88).outcome == REGRESSION
    not_again = confirm(first, step_times(rng), remeasured_e2e_s=3.01)
    assert not_again.outcome == NO_CHANGE and "not confirmed by re-measurement" in not_again.message


def host_synchronous(entry, syncs=494):
    return with_metrics(entry, kernel_path={"host_syncs_per_step": syncs})


def test_a_host_synchronous_combo_needs_the_larger_minimum_effect_and_the_verdict_says_why():
    # FLUX.1-dev nvfp4 eager on two fresh H100 machines, same code: 452 then 510 ms/step (+12.9 %)
    rng, combo_cv = np.random.default_rng(7), 0.03
    base = host_synchronous(record(0, step_times(rng, median_s=0.452, cv=combo_cv), combo="flux1-dev[nvfp4]"))
    machine = host_synchronous(record(1, step_times(rng, median_s=0.510, cv=combo_cv), combo="flux1-dev[nvfp4]"))
    (verdict,) = compare_run([base, machine], machine.run_id)
    assert verdict.outcome == NO_CHANGE
    assert verdict.policy.min_speed_effect == 0.15 and "494 host syncs per step" in verdict.message

    slower = host_synchronous(record(2, step_times(rng, median_s=0.452 * 1.25, cv=combo_cv), combo="flux1-dev[nvfp4]"))
    assert compare_run([base, slower], slower.run_id)[0].outcome == REGRESSION

    # the same +12.9 % on a combo whose step waits for the GPU once (as every other combo does) is a regression
    gpu_bound = record(3, step_times(rng, median_s=0.510, cv=combo_cv), combo="flux1-dev[nvfp4]")
    assert compare_run([base, host_synchronous(gpu_bound, 1)], gpu_bound.run_id)[0].outcome == REGRESSION
    # a combo that became host-synchronous is judged strictly: the new syncs may be the regression
    window = host_synchronous(record(4, step_times(rng, median_s=0.28, cv=combo_cv), combo="flux1-dev[nvfp4]"), 1)
    synced = host_synchronous(record(5, step_times(rng, median_s=0.28 * 1.10, cv=combo_cv), combo="flux1-dev[nvfp4]"),
                              60)
    (verdict,) = compare_run([window, synced], synced.run_id)
    assert verdict.outcome == REGRESSION and "host syncs per step rose to 60 (window runs: 1)" in verdict.message
    # a policy already stricter than the host-synchronous minimum (e.g. CPU's 50 %) is kept as it is
    cpu = Policy(min_speed_effect=0.5)
    assert compare_run([base, machine], machine.run_id, policy=cpu)[0].policy.min_speed_effect == 0.5


def test_records_made_before_the_allocator_setting_was_recorded_ran_torchs_default():
    old = {key: value for key, value in ENVIRONMENT.items() if key != "cuda_alloc_conf"}
    steps = [0.18] * 28
    history = [record(0, steps, environment=old), record(1, steps, environment={**ENVIRONMENT,
                                                                              "cuda_alloc_conf": "default"})]
    assert compare_run(history, history[-1].run_id)[0].outcome == NO_CHANGE


def test_records_made_before_cupti_teardown_was_recorded_left_cupti_attached():
    old = dict(ENVIRONMENT)
    steps = [0.18] * 28
    history = [record(0, steps, environment=old), record(1, steps, environment={**old, "cupti_teardown": False})]
    assert compare_run(history, history[-1].run_id)[0].outcome == NO_CHANGE
    history.append(record(2, steps, environment={**old, "cupti_teardown": True}))
    assert compare_run(history, history[-1].run_id)[0].outcome == NOT_COMPARABLE


def test_a_runs_remeasurement_record_is_evidence_not_another_candidate():
    rng = np.random.default_rng(8)
    history = [record(0, step_times(rng)), record(1, step_times(rng)), record(2, step_times(rng, 0.05))]
    history.append(replace(record(2, step_times(rng, 0.05)), outcome=REMEASURE))
    verdicts = compare_run(history, history[-1].run_id)
    assert [v.combo for v in verdicts] == ["flux1-dev[bf16]"] and verdicts[0].outcome == REGRESSION


def test_a_run_made_under_host_contention_or_with_the_gate_off_never_enters_a_window():
    # One contaminated run in a short window hid a 2.8x slowdown: such runs are kept out, and the verdict says why
    # when nothing else is left.
    normal, slow = [0.18] * 28, [0.18 * 2.8] * 28
    contended = with_metrics(record(1, [0.5] * 28), run_wait_s=[0.3] * 28)  # waited for a CPU 60 % of each step
    gate_off = record(2, [0.5] * 28, environment={**ENVIRONMENT, "history_gate": "off"})
    history = [record(0, normal), contended, gate_off, record(9, slow)]
    (verdict,) = compare_run(history, history[-1].run_id)
    assert verdict.outcome == REGRESSION and verdict.window_run_ids == (history[0].run_id,)
    (verdict,) = compare_run(history[1:], history[-1].run_id)
    assert verdict.outcome == NOT_COMPARABLE
    assert "2 kept out of windows, e.g. run with --history-gate off" in verdict.reason


def test_a_candidate_that_ran_under_host_contention_is_still_judged_and_the_verdict_says_so():
    # A change that oversubscribes the cores must not switch off its own judgement.
    candidate = with_metrics(record(9, [0.5] * 28), run_wait_s=[0.25] * 28)
    (verdict,) = compare_run([record(0, [0.18] * 28), candidate], candidate.run_id)
    assert verdict.outcome == REGRESSION
    assert any(note.startswith("host contention: the main thread waited for a CPU 50% of each step")
               for note in verdict.notes), verdict.notes
