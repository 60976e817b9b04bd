"""fluxgate.showing.card: A/A false alarms and detection of injected slowdowns, from recorded runs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fluxgate.showing import card
from fluxgate.storing.record import PASSED, Metrics, Record
from fluxgate.storing.verdicts import ABVerdict


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


# --- the A/B rule's section (fluxgate.showing.ab_card) -------------------------------------------------------------

def ab_run(run: int, ratios: list[float], combo="flux1-dev[fp8-scaled]", same_tree=True, inject=None,
           contention=None, loads=()) -> list[Record]:
    """One recorded A/B run's two records of `combo`: base and candidate, block ratios as recorded."""
    from fluxgate.storing.record import Record as R

    records = []
    for side in ("base", "candidate"):
        env = {"ab_run": f"ab{run}", "ab_side": side, "gpu": {"uuid": f"GPU-{run}"},
               "ab_tree": "t0" if same_tree or side == "base" else "t1"}
        if inject and side == "candidate":
            env["ab_inject"] = inject
        steps = [0.2] * (7 * len(ratios)) if side == "base" else [0.2 * r for r in ratios for _ in range(7)]
        records.append(R(combo=combo, run_id=f"ab{run}-{side}", gpu_class="nvidia-h200", profile="synthetic",
                         settings={}, outcome=PASSED, environment=env,
                         metrics=Metrics(step_times_s=steps, images=len(ratios)),
                         ab=ABVerdict("UNKNOWN", ratios=tuple(ratios), contention=contention, loads=loads)))
    return records


def test_ab_section_false_alarms_and_detection_from_resampled_quiet_blocks():
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(2)
    records = [r for run in range(3) for r in ab_run(run, list(np.exp(rng.normal(0, 0.003, 8))))]
    (row,) = ab_card.build(records, "nvidia-h200", simulations=200)
    assert (row.runs, row.blocks) == (3, 24) and row.simulations == 200
    assert row.false_alarms <= 0.02 and row.outcomes[0.0]["SAME"] >= 0.9
    assert row.detected(0.01) >= 0.9 and row.detected(0.03) == 1.0
    assert row.mean_blocks[0.03] < row.mean_blocks[0.0] + 1  # a clear slowdown stops early
    text = ab_card.markdown([row], "nvidia-h200")
    assert "| `flux1-dev[fp8-scaled]` | 3 (3) | 24 |" in text and "detected at +1%" in text


def test_noisy_blocks_detect_less_and_need_more_blocks_than_quiet_ones():
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(3)
    quiet = ab_run(0, list(np.exp(rng.normal(0, 0.002, 30))), combo="m[quiet]")
    noisy = ab_run(1, list(np.exp(rng.normal(0, 0.02, 30))), combo="m[noisy]")
    rows = {row.combo: row for row in ab_card.build(quiet + noisy, "nvidia-h200", simulations=200)}
    assert rows["m[noisy]"].detected(0.01) < rows["m[quiet]"].detected(0.01) - 0.5
    assert rows["m[noisy]"].mean_blocks[0.0] > rows["m[quiet]"].mean_blocks[0.0]
    assert rows["m[noisy]"].outcomes[0.0].get("UNKNOWN", 0) > 0.5  # the rule says it cannot tell, not SAME


def test_a_side_biased_pool_is_a_false_alarm_and_only_a_a_runs_count():
    from fluxgate.showing import ab_card

    biased = ab_run(0, [1.015, 1.012, 1.018, 1.016, 1.013, 1.017])  # the candidate side always 1.5 % slower
    (row,) = ab_card.build(biased, "nvidia-h200", simulations=100)
    assert row.false_alarms == 1.0
    others = ab_run(1, [1.3] * 6, same_tree=False) + ab_run(2, [1.3] * 6, inject={"combo": "x", "fraction": 0.3}) + \
        ab_run(3, [1.3] * 6, contention="base: host contention") + ab_run(4, [1.0, 1.001])
    rows = ab_card.build(others, "nvidia-h200", simulations=50)
    assert [(r.combo, r.recorded_runs, r.runs, r.simulations) for r in rows] == [
        ("flux1-dev[fp8-scaled]", 1, 0, 0)]  # one A/A run, of too few blocks
    assert "no run of 3+ recorded blocks: no figures" in ab_card.markdown(rows, "nvidia-h200")


def test_each_simulated_comparison_is_one_recorded_run_so_a_run_bias_is_not_averaged_away():
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(5)  # two loads, each with its own steady side bias of 3 %, opposite signs: more
    runs = ab_run(0, list(1.03 * np.exp(rng.normal(0, 0.001, 10)))) + \
        ab_run(1, list(0.97 * np.exp(rng.normal(0, 0.001, 10))))  # than a second load is asked to confirm
    (row,) = ab_card.build(runs, "nvidia-h200", simulations=200)
    assert row.false_alarms > 0.95  # pooled, the twenty blocks would average to 1.0 and look SAME
    assert 0.3 < row.outcomes[0.0]["SLOW"] < 0.7


def test_a_small_load_bias_is_judged_again_on_another_load_as_a_live_run_s_second_load():
    """One recorded run held two loads (`ab.loads`): +0.8 % (a FAST or SLOW on its own) and +0.05 %. Each is a run
    of the card; a SLOW on the first is judged again on the second, as a live run does, and does not stand: no false
    alarm; +2 % is SLOW on both loads."""
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(6)
    ratios = list(1.008 * np.exp(rng.normal(0, 0.0005, 6))) + list(1.0005 * np.exp(rng.normal(0, 0.0005, 6)))
    records = ab_run(0, ratios, loads=(1,) * 6 + (2,) * 6)
    (row,) = ab_card.build(records, "nvidia-h200", simulations=200)
    assert (row.runs, row.recorded_runs) == (2, 2)  # two loads of one recorded run
    assert row.false_alarms == 0 and row.outcomes[0.0].get("UNKNOWN", 0) > 0.3
    assert row.detected(0.02) == 1.0
    (alone,) = ab_card.build(ab_run(0, ratios[:6]), "nvidia-h200", simulations=200)
    assert alone.false_alarms == 1.0  # with no other load to judge it on, the biased load's SLOW stands
    # a block without usable steps is dropped after its load is known: the loads stay apart
    base, candidate = ab_run(0, ratios, loads=(1,) * 6 + (2,) * 6)
    steps = list(candidate.metrics.step_times_s)
    steps[7 * 2] = 0.0  # block 3 of load 1
    candidate = replace(candidate, metrics=replace(candidate.metrics, step_times_s=steps))
    loads = ab_card.combo_loads(base, candidate)
    assert [len(load) for load in loads] == [5, 6] and min(r for r, _ in loads[1]) < 1.002 < max(r for r, _ in loads[0])


def test_disturbed_blocks_are_set_aside_in_the_simulation_as_in_a_live_run():
    from dataclasses import replace

    from fluxgate.judging import paired
    from fluxgate.showing import ab_card

    base, candidate = ab_run(0, [1.0] * 12)
    steps = list(candidate.metrics.step_times_s)
    for image in (3, 4, 5):  # a neighbour's burst: the candidate's images 3-5 erratic and 8 % slower
        steps[image * 7:(image + 1) * 7] = [0.2 * (1.08 + 0.01 * (k % 3)) for k in range(7)]
    candidate = replace(candidate, metrics=replace(candidate.metrics, step_times_s=steps))
    blocks = ab_card.combo_blocks(base, candidate)
    assert [bool(why) for _, why in blocks] == [False] * 3 + [True] * 3 + [False] * 6
    assert "candidate's steps spread" in str(blocks[3][1])
    (row,) = ab_card.build([base, candidate], "nvidia-h200", simulations=200)
    (judged,) = ab_card.build([base, candidate], "nvidia-h200", simulations=200,
                              policy=paired.PairedPolicy(max_disturbed=0))
    assert row.disturbed == 3 and row.detected(0.02) == judged.detected(0.02) == 1.0
    assert row.mean_blocks[0.02] < judged.mean_blocks[0.02] - 3  # the burst set aside: seen in far fewer blocks
    # never SAME more often than judging every block: set-aside blocks must fit the band too
    assert row.outcomes[0.0].get("SAME", 0.0) <= judged.outcomes[0.0].get("SAME", 0.0)


def test_simulations_draw_from_usable_runs_and_an_empty_pool_has_no_figures():
    import math
    import random

    from fluxgate.judging import paired
    from fluxgate.showing import ab_card

    short, long_ = [1.0, 1.01, 0.99], [1.0, 1.002, 0.998, 1.001, 0.999, 1.0]
    assert ab_card.usable([short, long_]) == [[(r, None) for r in long_]]  # a run of 5+ blocks exists
    rows = ab_card.build(ab_run(0, short) + ab_run(1, long_), "nvidia-h200", simulations=20)
    assert rows[0].left_out == [(3, pytest.approx(1.0, abs=1e-3))]
    assert "left out, too short: a run of 3 blocks at" in ab_card.markdown(rows, "nvidia-h200")
    assert ab_card.usable([short, [1.0]]) == [[(r, None) for r in short]]
    assert ab_card.usable([[1.0, 1.0]]) == [] and ab_card.usable([[]]) == []
    shares, used = ab_card.simulate([[]], paired.PairedPolicy(), 0.0, 10, random.Random(0))
    assert shares == {} and math.isnan(used)
    # a run shorter than the rule's block limit goes on drawing from itself: a comparison may judge up to 20 blocks
    noisy = list(np.exp(np.random.default_rng(7).normal(0, 0.01, 6)))
    _, blocks = ab_card.simulate([noisy], paired.PairedPolicy(), 0.0, 50, random.Random(1))
    assert blocks > 6


def test_a_host_synchronous_combo_is_simulated_at_its_own_effect():
    from fluxgate.showing import ab_card

    biased = ab_run(0, [0.98, 0.975, 0.985, 0.978, 0.982, 0.981, 0.979, 0.98], combo="flux1-dev[nvfp4]")
    (plain,) = ab_card.build(biased, "nvidia-h200", simulations=100)
    (synchronous,) = ab_card.build(biased, "nvidia-h200", simulations=100, host_synchronous=["flux1-dev[nvfp4]"])
    assert plain.false_alarms == 1.0 and synchronous.false_alarms == 0.0 and synchronous.host_synchronous
    biased = [replace(record, ab=replace(record.ab, host_synchronous=True)) for record in biased]  # as recorded
    (recorded,) = ab_card.build(biased, "nvidia-h200", simulations=100)
    assert recorded.host_synchronous and recorded.false_alarms == 0.0
    assert "host-synchronous: judged at ±4%" in ab_card.markdown([synchronous], "nvidia-h200")


def test_real_injected_runs_are_listed_beside_the_resampled_detection():
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(6)
    aa = ab_run(0, list(np.exp(rng.normal(0, 0.002, 12))))
    injected = ab_run(1, [1.02, 1.021, 1.019], inject={"combo": "*", "fraction": 0.02})
    injected = [replace(record, ab=replace(record.ab, outcome="SLOW", ratio=1.02, blocks=3)) for record in injected]
    runs = ab_card.injected_runs(aa + injected, "nvidia-h200")
    assert [(r.combo, r.fraction, r.outcome, r.blocks) for r in runs] == [("flux1-dev[fp8-scaled]", 0.02, "SLOW", 3)]
    text = ab_card.markdown(ab_card.build(aa + injected, "nvidia-h200", simulations=100), "nvidia-h200",
                            injected=runs)
    assert "### Real injected runs" in text and "| `flux1-dev[fp8-scaled]` | +2.0% | steps | `ab1` | not recorded | SLOW | 3 |" in text
    assert "**1 of 1** real injected runs SLOW" in text


def test_block_ratios_of_records_without_recorded_ratios_come_from_per_image_medians():
    from dataclasses import replace

    from fluxgate.showing import ab_card

    base, candidate = ab_run(0, [1.01, 0.99, 1.02])
    candidate = replace(candidate, ab=None)
    assert ab_card.block_ratios(base, candidate) == pytest.approx([1.01, 0.99, 1.02])


def test_the_card_keeps_ab_records_out_of_its_one_sided_rows_and_adds_the_ab_section(tmp_path):
    from fluxgate import card as command
    from fluxgate.showing import ab_card

    rng = np.random.default_rng(4)
    one_sided = [record(i, list(0.175 * (1 + rng.normal(0, 0.002, 27)))) for i in range(3)]
    ab = [r for run in range(2) for r in ab_run(run, list(np.exp(rng.normal(0, 0.003, 10))), combo="flux1-dev[bf16]")]
    (row,) = card.build(one_sided + ab, "nvidia-h200")
    assert row.comparisons == 3  # the A/B runs' records are no one-sided runs
    text = card.markdown([row], "nvidia-h200", 3, ab_card.build(ab, "nvidia-h200", simulations=50))
    assert "## The A/B rule" in text and "| `flux1-dev[bf16]` | 2 (2) | 20 |" in text
    from dataclasses import replace

    from fluxgate.storing.local import LocalFolderStore

    store = LocalFolderStore(tmp_path)
    for r in one_sided + ab:  # and through the command, from run files
        store.open_run(r.run_id, r.env).append(replace(r, environment=None, run_id=None))
    out = tmp_path / "card.md"
    assert command.main([str(tmp_path), "--gpu-class", "nvidia-h200", "--out", str(out)]) == 0
    assert "from 3 recorded runs" in out.read_text() and "## The A/B rule" in out.read_text()
