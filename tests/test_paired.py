"""fluxgate.judging.paired: the sequential verdict of an A/B run from per-block candidate/base step-time ratios."""

from __future__ import annotations

import math
import random

import pytest

from fluxgate.judging.paired import (
    CPU_POLICY,
    FAST,
    SAME,
    SLOW,
    UNKNOWN,
    PairedPolicy,
    block_ratio,
    judge,
    policy_for,
)


def _sequential(effect: float, noise: float, seed: int, policy: PairedPolicy = PairedPolicy()):
    """Blocks of lognormal ratios around 1 + effect, judged after each as an A/B run would."""
    rng, ratios = random.Random(seed), []
    while True:
        ratios.append((1 + effect) * math.exp(rng.gauss(0.0, noise)))
        verdict = judge(ratios, policy)
        if verdict is not None:
            return verdict


def test_a_block_ratio_is_candidate_mean_step_over_base_mean_step():
    assert block_ratio([0.10, 0.11, 0.30], [0.12, 0.121, 0.119]) == pytest.approx(0.36 / 0.51)
    with pytest.raises(ValueError, match="both sides"):
        block_ratio([], [0.1])


def test_too_few_blocks_ask_for_another_unless_the_budget_is_spent():
    assert judge([1.0, 1.01]) is None
    spent = judge([1.0, 1.01], out_of_budget=True)
    assert spent.outcome == UNKNOWN and "at least 3 needed" in spent.message


@pytest.mark.parametrize("seed", range(20))
def test_same_code_on_both_sides_is_same_at_h200_block_noise(seed):
    # 0.3 % block-to-block spread: what one H200 gives between two images of an eager combo
    assert _sequential(0.0, 0.003, seed).outcome == SAME


@pytest.mark.parametrize("seed", range(20))
def test_one_percent_slower_is_slow_and_two_percent_faster_is_fast(seed):
    slow = _sequential(0.01, 0.003, seed)
    assert slow.outcome == SLOW and slow.low > 1 and slow.blocks <= 20, slow.message
    assert _sequential(-0.02, 0.003, seed).outcome == FAST


def test_a_shift_below_the_minimum_effect_is_same_not_slow():
    assert judge([1.002] * 5).outcome == SAME


def test_noise_the_budget_cannot_beat_is_unknown_and_says_how_many_blocks_would_settle_it():
    verdict = _sequential(0.0, 0.03, seed=1)
    assert verdict.outcome == UNKNOWN and verdict.blocks == PairedPolicy().max_blocks
    assert "blocks: raise --ab-max-blocks or the budget" in verdict.message


def test_cpu_runs_are_judged_at_cpu_scale():
    assert policy_for("cpu") is CPU_POLICY and policy_for("cuda") == PairedPolicy()
    assert _sequential(0.0, 0.03, seed=2, policy=CPU_POLICY).outcome == SAME
    assert _sequential(0.5, 0.05, seed=2, policy=CPU_POLICY).outcome == SLOW


def test_a_block_is_disturbed_when_one_side_alone_spread_its_steps():
    from fluxgate.judging.paired import disturbance

    steady, burst = [0.2455, 0.2456, 0.2454, 0.2455], [0.2697, 0.2559, 0.2641, 0.2570]
    found = disturbance(steady, burst)
    assert found.side == "candidate" and "candidate's steps spread 5.4% against the base's 0.08%" == str(found)
    assert disturbance(burst, steady).side == "base"
    ramp = [0.170, 0.175, 0.180, 0.185]  # bf16 climbing to the power cap: alike on both sides
    assert disturbance(ramp, [s * 1.01 for s in ramp]) is None
    assert disturbance(steady, [0.2455, 0.2470, 0.2460, 0.2458]) is None  # under 1 %
    assert disturbance([0.2], [0.3]) is None  # one step shows no spread
    assert disturbance([0.0, 0.2], burst) is None  # no positive step time: nothing to say


def test_disturbed_blocks_are_set_aside_up_to_the_policy_cap_then_judged():
    from fluxgate.judging.paired import Blocks, Disturbance

    base, candidate = Disturbance("base", 0.05, 0.001), Disturbance("candidate", 0.05, 0.001)
    blocks = Blocks(PairedPolicy(max_disturbed=2))
    assert [blocks.add(1.0 + i / 100, [base, candidate][i % 2]) for i in range(4)] == [False, False, True, True]
    assert blocks.ratios == [1.02, 1.03] and len(blocks.set_aside) == 2 and not blocks.restored
    assert blocks.note().startswith("; 2 disturbed block(s) set aside (base's steps spread")
    assert not CPU_POLICY.max_disturbed and Blocks(CPU_POLICY).add(1.0, base)


def test_disturbances_that_keep_to_one_side_are_judged_after_all():
    from fluxgate.judging.paired import Blocks, Disturbance

    stall = Disturbance("candidate", 0.05, 0.001)
    blocks = Blocks(PairedPolicy())  # lopsided at 3
    assert [blocks.add(r, d) for r, d in ((1.0, None), (1.06, stall), (1.0, None), (1.07, stall), (1.05, stall))] \
        == [True, False, True, False, True]
    assert blocks.restored and sorted(blocks.ratios) == [1.0, 1.0, 1.05, 1.06, 1.07]
    assert blocks.add(1.08, stall) and "3 on the candidate's side: judged, not set aside" in blocks.note()


def test_a_candidate_that_stalls_now_and_then_is_not_called_same_more_often_for_the_set_aside():
    """Half the candidate's images 3-6 % slower with uneven steps, the base's steady: setting disturbed blocks aside
    must not turn that into SAME more often than judging every block does (3 clean blocks first can be SAME either
    way: that is the rule's min_blocks, not the set-aside)."""
    from fluxgate.judging.paired import Blocks, disturbance

    def same_share(policy: PairedPolicy) -> float:
        same = 0
        for seed in range(200):
            rng, blocks, verdict = random.Random(seed), Blocks(policy), None
            while verdict is None:
                base = [0.2 * (1 + rng.gauss(0, 0.0005)) for _ in range(5)]
                slow = 1.03 + 0.03 * rng.random() if rng.random() < 0.5 else None
                candidate = [0.2 * (slow + 0.02 * (k % 2)) if slow else 0.2 * (1 + rng.gauss(0, 0.0005))
                             for k in range(5)]
                blocks.add(block_ratio(base, candidate), disturbance(base, candidate))
                verdict = blocks.judge()
            same += verdict.outcome == SAME
        return same / 200

    with_set_aside, judged_all = same_share(PairedPolicy()), same_share(PairedPolicy(max_disturbed=0))
    assert judged_all < 0.2 and with_set_aside <= judged_all + 0.02


def test_same_needs_the_set_aside_blocks_inside_the_band_too():
    from fluxgate.judging.paired import Blocks, Disturbance

    burst = Disturbance("base", 0.05, 0.001)
    blocks = Blocks(PairedPolicy(max_blocks=5))
    for ratio, why in ((1.0, None), (0.93, burst), (1.0003, None), (0.9998, None), (1.0001, None)):
        blocks.add(ratio, why)
    assert judge(blocks.ratios).outcome == SAME and blocks.judge() is None  # 0.93 set aside, yet not SAME yet
    blocks.add(1.0)
    verdict = blocks.judge()
    assert verdict.outcome == UNKNOWN and "SAME without the 1 disturbed block(s) set aside, UNKNOWN with them" \
        in verdict.message


def test_set_aside_blocks_never_turn_slow_into_same():
    from fluxgate.judging.paired import Blocks, Disturbance

    stall = Disturbance("candidate", 0.05, 0.001)
    rng, blocks = random.Random(3), Blocks(PairedPolicy())
    for index in range(20):  # 18 blocks at +0.68 %, two stalled candidate images at +1.5 %
        blocks.add(1.015 if index in (4, 11) else 1.0068 + rng.uniform(-0.0004, 0.0004), stall if index in (4, 11)
                   else None)
    assert judge(blocks.ratios).outcome == SAME  # the judged blocks alone
    assert judge(blocks.ratios + [1.015, 1.015]).outcome == SLOW  # every block
    assert blocks.judge() is None  # room for more blocks: measure on
    verdict = blocks.judge(out_of_budget=True)
    assert verdict.outcome == UNKNOWN and "SLOW with them" in verdict.message


def test_a_host_synchronous_combo_is_judged_at_its_own_wider_effect():
    from fluxgate.judging.paired import HOST_SYNC_EFFECT, host_synchronous

    policy = host_synchronous(PairedPolicy())
    assert policy.min_effect == policy.equivalence == HOST_SYNC_EFFECT > PairedPolicy().min_effect
    assert judge([1.02, 1.021, 1.019, 1.02], PairedPolicy()).outcome == SLOW
    assert judge([1.02, 1.021, 1.019, 1.02], policy).outcome == SAME  # a 2 % shift is inside its ±4 %


def _shaped(shape: str, steps: int, step_s: float, effect: float) -> list[float]:
    """One candidate image's steps after its first with a slowdown of mean `effect` in `shape`: every step alike, a
    stall on every fifth step, a sync every other step, a drift from none to twice the effect across the image (a
    clock that sags as the GPU heats), the second half of the steps only."""
    if shape == "constant":
        return [step_s * (1 + effect)] * steps
    if shape == "drift across the image":
        return [step_s * (1 + 2 * effect * k / (steps - 1)) for k in range(steps)]
    if shape == "second half only":
        return [step_s * (1 + 2 * effect) if k >= steps // 2 else step_s for k in range(steps)]
    every = 5 if shape == "stall every 5th step" else 2
    return [step_s * (1 + every * effect) if k % every == every - 1 else step_s for k in range(steps)]


@pytest.mark.parametrize("shape", ["constant", "stall every 5th step", "sync every other step",
                                   "drift across the image", "second half only"])
def test_slowdowns_that_are_not_a_constant_shift_come_out_slow(shape):
    """+2 % of the steps' time in any shape is SLOW, with each side's disturbed blocks (a stall spreads the
    candidate's steps) set aside as a live run sets them aside: a pattern that keeps to the candidate's side is
    judged, never made SAME. The median step (the rule before) saw nothing of the last two."""
    from fluxgate.judging.paired import Blocks, disturbance

    slow = 0
    for seed in range(40):
        rng, blocks, verdict = random.Random(seed), Blocks(PairedPolicy()), None
        while verdict is None:
            noise = [1 + rng.gauss(0, 0.002) for _ in range(10)]
            base = [0.25 * n for n in noise]
            candidate = [s * n * (1 + rng.gauss(0, 0.001)) for s, n in zip(_shaped(shape, 10, 0.25, 0.02), noise)]
            blocks.add(block_ratio(base, candidate), disturbance(base, candidate))
            verdict = blocks.judge()
        slow += verdict.outcome == SLOW
        assert verdict.outcome != SAME, (seed, verdict.message)
    assert slow >= 38


def _by_case(effects: list[float], seed: int, noise: float = 0.001):
    """A sequential comparison whose block k makes case k % len(effects) on both sides, that case slowed by its own
    effect, as `interleave.run_blocks` passes the case: its verdict."""
    from fluxgate.judging.paired import Blocks

    rng, blocks, verdict = random.Random(seed), Blocks(PairedPolicy(), cases=len(effects)), None
    while verdict is None:
        case = len(blocks.ratios) % len(effects)
        blocks.add((1 + effects[case]) * math.exp(rng.gauss(0.0, noise)), None, f"case{case}")
        verdict = blocks.judge()
    return verdict


@pytest.mark.parametrize("slowed", [0, 1, 2, 3])
def test_a_slowdown_on_one_case_of_four_is_slow_by_case_where_the_blocks_interval_stays_unknown(slowed):
    """A step cache that skips fewer steps for one prompt: +8 % on one case of four, +2 % on the mean. The blocks'
    interval reads the case-to-case spread as noise (UNKNOWN at 20 blocks); each case weighted alike, it is SLOW,
    whichever case it is."""
    effects = [0.0, 0.0, 0.0, 0.0]
    effects[slowed] = 0.08
    verdicts = [_by_case(effects, seed) for seed in range(40)]
    assert all(v.outcome == SLOW and "4 cases weighted alike" in v.message for v in verdicts), \
        [v.message for v in verdicts if v.outcome != SLOW][:2]
    assert max(v.blocks for v in verdicts) <= 12
    without_cases = [_sequential_blocks(effects, seed) for seed in range(10)]
    assert all(v.outcome in (UNKNOWN, SAME) for v in without_cases)  # SAME at 3 blocks when the 4th case is slowed


def _sequential_blocks(effects: list[float], seed: int, noise: float = 0.001):
    rng, ratios = random.Random(seed), []
    while True:
        ratios.append((1 + effects[len(ratios) % len(effects)]) * math.exp(rng.gauss(0.0, noise)))
        verdict = judge(ratios, PairedPolicy())
        if verdict is not None:
            return verdict


@pytest.mark.parametrize("slowed", [1, 2, 3])
def test_no_same_before_every_case_was_made(slowed):
    """With four cases a SAME after three blocks would not have seen the fourth: a slowdown there must not pass."""
    effects = [0.0, 0.0, 0.0, 0.0]
    effects[slowed] = 0.08
    for seed in range(40):
        verdict = _by_case(effects, seed, noise=0.0003)
        assert verdict.outcome != SAME, verdict.message


def test_the_by_case_interval_holds_its_confidence_when_cases_differ_in_spread_and_count():
    """Welch-Satterthwaite degrees of freedom: one case ten times noisier than the others, or 3/3/2/2 blocks, and a
    99 % interval still misses 1 in about 100 (with n - cases it missed 8.5 % for the noisy case)."""
    from fluxgate.judging.paired import by_case_interval

    def misses(noises, counts, simulations=2000):
        rng, missed = random.Random(1), 0
        for _ in range(simulations):
            ratios, strata = [], []
            for case, (noise, count) in enumerate(zip(noises, counts)):
                ratios += [math.exp(rng.gauss(0.0, noise)) for _ in range(count)]
                strata += [case] * count
            _, low, high, _ = by_case_interval(ratios, strata, 0.99)
            missed += not low <= 1 <= high
        return missed / simulations

    assert misses([0.01, 0.001, 0.001, 0.001], [2, 2, 2, 2]) < 0.025
    assert misses([0.001] * 4, [3, 3, 2, 2]) < 0.02
    assert by_case_interval([1.01, 1.01, 1.0, 1.0], ["a", "a", "b", "b"], 0.99) is None  # no spread within a case
    assert by_case_interval([1.01, 1.02, 1.0, 1.001], ["a", "a", "b", "b"], 0.99, cases=3) is None  # one not made


def test_cases_that_sit_apart_on_identical_trees_make_no_alarm_by_case():
    """An A/A run whose cases carry steady offsets of their own (+-0.4 %, mean 0) is never SLOW or FAST by case."""
    outcomes = {_by_case([0.004, -0.004, 0.003, -0.003], seed).outcome for seed in range(40)}
    assert outcomes <= {SAME, UNKNOWN}, outcomes


# --- a second load of both sides -----------------------------------------------------------------------------------

def _loaded(bias: float, effect: float, rng: random.Random, policy: PairedPolicy = PairedPolicy()):
    """One load's verdict: its own side bias (steady over all its blocks) on top of `effect`, block noise 0.05 %
    (what one H100 load of eager fp8 showed around its own mean)."""
    ratios = []
    while True:
        ratios.append((1 + effect) * (1 + bias) * math.exp(rng.gauss(0.0, 0.0005)))
        verdict = judge(ratios, policy)
        if verdict is not None:
            return verdict


def test_a_small_slow_or_fast_needs_a_second_load_and_a_large_one_or_a_cpu_s_does_not():
    from fluxgate.judging.paired import needs_second_load

    verdict = judge([0.992, 0.9921, 0.9919])
    assert verdict.outcome == FAST and needs_second_load(verdict, PairedPolicy())
    assert not needs_second_load(judge([1.05, 1.051, 1.049]), PairedPolicy())  # 5 % is no load's bias
    assert not needs_second_load(judge([1.002] * 5), PairedPolicy())  # SAME
    assert not needs_second_load(judge([0.7, 0.71, 0.69], CPU_POLICY), CPU_POLICY)  # a CPU's offset is its process's


def test_loads_that_agree_keep_the_verdict_and_one_that_does_not_makes_it_unknown():
    from fluxgate.judging.paired import confirm

    first, policy = judge([1.012, 1.0121, 1.0119]), PairedPolicy()
    agreeing = confirm(first, judge([1.009, 1.0091, 1.0089]), policy)
    assert agreeing.outcome == SLOW and agreeing.blocks == 6 and agreeing.ratio == pytest.approx(1.009, abs=1e-4)
    assert "on two loads of both sides: first load +1.20% (SLOW, 3 blocks), second load +0.90%" in agreeing.message
    refuted = confirm(first, judge([1.001, 1.0011, 1.0009]), policy)
    assert refuted.outcome == UNKNOWN and refuted.blocks == 6 and "side bias a load can carry" in refuted.message
    assert refuted.ratio == pytest.approx(math.sqrt(1.012 * 1.001), abs=1e-4)
    untried = confirm(first, None, policy)
    assert untried.outcome == SLOW and "not confirmed on a second load (none was made)" in untried.message
    large = judge([1.04, 1.041, 1.039])
    assert confirm(large, judge([1.0, 1.001, 0.999]), policy) is large
    image = confirm(first, judge([1.001, 1.0011, 1.0009]), policy, "image time")
    assert image.message.startswith("UNKNOWN: candidate/base image time")
    empty = confirm(first, judge([], out_of_budget=True), policy)  # a second load without a block
    assert empty.outcome == UNKNOWN and empty.ratio == first.ratio and "nan" not in empty.message


def test_a_host_synchronous_combo_confirms_up_to_twice_its_effect_and_a_cpu_never():
    from fluxgate.judging.paired import HOST_SYNC_EFFECT, confirm, host_synchronous, needs_second_load

    policy = host_synchronous(PairedPolicy())
    assert policy.confirm_below == 2 * HOST_SYNC_EFFECT
    fast = judge([0.955, 0.9551, 0.9549], policy)  # -4.5 %: a host-synchronous load's bias reached -3.7 %
    assert fast.outcome == FAST and needs_second_load(fast, policy)
    assert confirm(fast, judge([0.99, 0.991, 0.989], policy), policy).outcome == UNKNOWN
    assert host_synchronous(CPU_POLICY).confirm_below == 0.0


def test_a_second_load_stops_load_bias_alarms_and_keeps_two_percent_slow():
    """Loads biased by 0.35 % (the H100's load-to-load spread of eager fp8, within ±0.05 % over each load's blocks):
    one load alone calls several A/A comparisons FAST or SLOW; confirmed on a second load, hardly any; +2 % stays
    SLOW every time."""
    from fluxgate.judging.paired import confirm

    policy, rng = PairedPolicy(), random.Random(7)

    def comparison(effect: float, second: bool):
        first = _loaded(rng.gauss(0.0, 0.0035), effect, rng)
        return confirm(first, _loaded(rng.gauss(0.0, 0.0035), effect, rng), policy) if second else first

    one = sum(comparison(0.0, False).outcome in (SLOW, FAST) for _ in range(400))
    two = sum(comparison(0.0, True).outcome in (SLOW, FAST) for _ in range(400))
    assert one >= 8 and two <= 1, (one, two)
    assert all(comparison(0.02, True).outcome == SLOW for _ in range(200))


def test_the_by_case_rule_changes_no_slow_or_fast_of_the_recorded_gpu_runs():
    """docs/methodology.md's replay, kept: every recorded GPU A/B load of 3+ blocks and 2+ cases (baselines/*/runs),
    judged block by block as recorded, with each block's case (block number mod the combo's cases) and without: the
    SLOW and FAST verdicts are the same ones."""
    import json
    from pathlib import Path

    from fluxgate.judging.paired import host_synchronous

    def sequential(ratios, policy, cases=None):
        for n in range(1, len(ratios) + 1):
            strata = [k % cases for k in range(n)] if cases else None
            verdict = judge(ratios[:n], policy, n == len(ratios), strata, cases)
            if verdict is not None:
                return verdict

    replayed = 0
    for path in sorted(Path(__file__).parents[1].glob("baselines/nvidia-*/runs/*-candidate.json")):
        for record in json.loads(path.read_text())["records"]:
            ab, cases = record.get("ab") or {}, len((record.get("settings") or {}).get("cases") or [])
            ratios = [r for r in ab.get("ratios") or [] if isinstance(r, float) and r > 0]
            if len(ratios) < 3 or cases < 2:
                continue
            policy = host_synchronous(PairedPolicy()) if ab.get("host_synchronous") else PairedPolicy()
            plain, by_case = sequential(ratios, policy), sequential(ratios, policy, cases)
            replayed += 1
            decided = {plain.outcome, by_case.outcome} & {SLOW, FAST}
            assert not decided or plain.outcome == by_case.outcome, (path.name, record["combo"], plain.message,
                                                                     by_case.message)
    assert replayed >= 100
