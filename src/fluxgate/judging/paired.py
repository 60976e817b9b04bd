"""The paired verdict of an A/B run: base and candidate measured on one GPU, alternating image by image, judged on
their per-block step-time ratios (duet / interleaved benchmarking).

A **block** is one base image and one candidate image made back to back (the order alternates between blocks: A B,
B A, ...), so a drift of the machine (clocks, temperature, a neighbour) lands on both sides of a block alike. Its ratio
is the candidate's mean step time over the base's (`block_ratio`; the CPU policy's median), each over its image's
steps after the first: the loop time a user waits for per step. The median step would miss every slowdown that is not a constant shift: a stall
on every fifth step, a periodic sync, a step cache that skips fewer steps. The first step is a per-image cost, not a
sample of the steady state (on an H200 it moves by 5-15 % from image to image for eager fp8, whose start is
launch-bound): a new cost there is judged with the whole image (`judging.interleave.image_s`). The verdict is
sequential: after each block the geometric mean
ratio gets a Student-t interval over the log ratios (scipy), at `confidence` per look — 99.9 % two-sided by default,
so that up to `max_blocks` looks keep the overall error small — and

- **SLOW**: the interval lies above 1 and the mean ratio is at least `1 + min_effect`;
- **FAST**: the interval lies below 1 and the mean ratio is at most `1 - min_effect`;
- **SAME**: the interval lies inside `1 ± equivalence` (and neither of the above);
- **UNKNOWN**: `max_blocks` were measured (or the time budget ran out) with none of these; the message names how many
  blocks the measured spread would need.

Until `min_blocks` blocks, or while no outcome is clear, `judge` returns None: measure another block.

Block k makes the same case (prompt) on both sides, cycling through the combo's cases, so a slowdown that comes on
some cases only (a step cache that skips fewer steps for some prompts) gives the blocks a spread by case that the
blocks' interval reads as noise: +8 % on one case of four is +2 % on the mean, and stays UNKNOWN there at 20 blocks.
Where the blocks' interval says neither SLOW nor FAST, the same rules are applied to the **by-case** interval (each
case's mean log ratio weighted alike, its variance from the blocks within each case: `by_case_interval`), once every
case made has 2+ blocks; SAME is decided on the blocks alone, and (where the number of cases is known) only once
every case was made: a slowdown may sit on the one not made yet.

A **load** (both sides' pipelines built and placed on the device once) carries a side bias of its own, steady over all
its blocks, which one load's interval cannot see: SLOW and FAST verdicts with a shift under `confirm_below` are judged
again on a second load of both sides and stand only if it agrees (`confirm`).

A block is **disturbed** (`disturbance`) when one side's image had steps spread far wider than the other's: on an
H200 the steps of one eager image lie within 0.1-1 % of each other, or move together on both sides (bf16's ramp to
the power cap: 5-10 % within each image, alike on both), while a burst of host work from a neighbour (another job
loading a model on the same host) stretched every step of the one image it hit by 4-17 %, one side at a time. Up to
`max_disturbed` such blocks per combo are set aside and measured again (`Blocks`); past that they count, and once one
side holds `lopsided` more of them than the other, all of them count: a burst lands on either side, while a
candidate whose own steps became erratic keeps disturbing its own side and is judged on those steps.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

SAME, SLOW, FAST, UNKNOWN = "SAME", "SLOW", "FAST", "UNKNOWN"


@dataclass(frozen=True)
class PairedPolicy:
    """When a paired comparison stops and what it concludes. Fractions of the base's step time."""

    # The smallest shift called SLOW or FAST. Above the side bias one load of a combo can carry on an H200: in A/A runs
    # (20261130T133942Z-d10a23, -133944Z-08ba2e, -134847Z-f0119b, -134850Z-6d39a5, -140902Z-280331) a combo's blocks
    # sat steadily at up to ±0.5 % for the whole load (z-image-turbo[fp8-scaled] -0.42 % and, on another host,
    # +0.50 %; flux1-kontext-dev[bf16] +0.46 %; flux1-dev[fp8-scaled] +0.42 %) and near 0 on the next load: with 0.5 %
    # they made FAST and SLOW verdicts. 0.25 points of headroom: a load biased more than that is a false alarm.
    min_effect: float = 0.0075
    equivalence: float = 0.01  # SAME when the interval lies within 1 ± this
    confidence: float = 0.999  # two-sided, per look
    min_blocks: int = 3
    max_blocks: int = 20
    max_disturbed: int = 5  # disturbed blocks set aside per combo at most (0: none)
    disturbed_spread: float = 0.01  # a side's (max - min) / min step time within its image above this ...
    disturbed_factor: float = 5.0  # ... and above this many times the other side's (at least 0.1 %): disturbed
    lopsided: int = 3  # one side holding this many more set-aside blocks than the other: they are all judged
    # Each side's step time in a block: "mean" (every slowdown that is not a constant shift counts: a stall on some
    # steps, a periodic sync) or "median" (a noisy host's preempted steps do not).
    statistic: str = "mean"
    # A SLOW or FAST verdict whose shift is under this stands only when a second load of both sides shows it too
    # (`confirm`; 0: never; combos whose loads alternate load for every image, so their blocks span loads already).
    # Each load of a combo carries its own side bias, steady over all its blocks, so one load's interval cannot see
    # it: on an H100 (20261207T211207Z-d610c3 to -213305Z-e6a216, identical trees)
    # z-image-turbo[fp8-scaled]'s loads sat at -0.79, -0.40, -0.38, -0.26, -0.16, +0.08 and +0.39 %, each within
    # ±0.05 % over its own blocks, and flux1-dev[fp8-scaled]'s at -0.42, -0.35, -0.13, +0.15 and +0.26 %: about 0.35 %
    # from load to load, and the -0.79 % load was an A/A FAST. 2.5 % is seven such deviations: a larger shift is no
    # load's bias, and a change that large is not worth a second load.
    confirm_below: float = 0.025


# On a CPU (the tiny profile) steps of a few milliseconds move by 5-25 % with the host: the same rule at CPU scale.
# Every CPU image is "disturbed" by that measure, so no block is set aside there; and the median step, since one
# preempted step of a 7-step tiny image moves its mean by several percent (an A/A run on a busy 2-core CI machine
# came out FAST at -7.4 % on the mean). Two processes of the same tree also sit apart by a per-process offset on a
# shared virtual machine: clean-clone CI A/A runs came out +10.7 % (19 blocks, each side on its own vCPU) and +6.3 %
# (36 blocks, both on one CPU) on the steps, and -6.2 % on the whole image (4 blocks, text encoding and decode are
# most of a tiny CPU image): SLOW / FAST from 15 %, SAME inside ±20 %, steps and image alike. The quick start
# judges gross slowdowns (the tests inject 60 %); the GPU gate judges their shapes.
# A CPU worker's offset is its process's, which a second load in the same processes keeps: no second load.
CPU_POLICY = PairedPolicy(min_effect=0.15, equivalence=0.20, confidence=0.99, min_blocks=3, max_blocks=12,
                          max_disturbed=0, statistic="median", confirm_below=0.0)


# A host-synchronous combo (its step waits for the GPU again and again: `judging.compare.is_host_synchronous`, e.g. the
# eager nvfp4 path) follows the host's CPU: on H200s its blocks spread 1-4 % and one load of it sat at -2.0 % and
# another at -3.7 % on identical trees (A/A runs 20261130T134847Z-f0119b, -110325Z-ffb4f5). Its own limit:
HOST_SYNC_EFFECT = 0.04


def host_synchronous(policy: PairedPolicy) -> PairedPolicy:
    """`policy` for a host-synchronous combo: SLOW / FAST from a HOST_SYNC_EFFECT shift, SAME within ± that; a SLOW
    or FAST under twice that judged again on a second load (where the policy confirms at all): its loads' own biases
    reached 3.7 %."""
    return replace(policy, min_effect=max(policy.min_effect, HOST_SYNC_EFFECT),
                   equivalence=max(policy.equivalence, HOST_SYNC_EFFECT),
                   confirm_below=max(policy.confirm_below, 2 * HOST_SYNC_EFFECT) if policy.confirm_below else 0.0)


def policy_for(device_type: str) -> PairedPolicy:
    """The default policy of a device type: `PairedPolicy()` on CUDA, `CPU_POLICY` elsewhere."""
    return PairedPolicy() if device_type == "cuda" else CPU_POLICY


@dataclass(frozen=True)
class PairedVerdict:
    """A combo's A/B verdict: outcome, mean candidate/base step-time ratio and its interval, blocks used."""

    outcome: str
    ratio: float
    low: float
    high: float
    blocks: int
    message: str
    by_case: int = 0  # the number of cases weighted alike when the by-case interval decided it, else 0


def block_ratio(base_step_times_s: Sequence[float], candidate_step_times_s: Sequence[float],
                statistic: str = "mean") -> float:
    """Candidate / base step time of one block (seconds per step: each side's image's steps after its first), each
    side's "mean" (the default, CUDA's) or "median" (the CPU policy's). Raises ValueError for an empty side or an
    unknown statistic."""
    if not base_step_times_s or not candidate_step_times_s:
        raise ValueError("a block needs step times from both sides")
    if statistic not in ("mean", "median"):
        raise ValueError(f"block statistic {statistic!r}: want mean or median")
    of = statistics.fmean if statistic == "mean" else statistics.median
    return of(candidate_step_times_s) / of(base_step_times_s)


def _spread(step_times_s: Sequence[float]) -> float:
    low = min(step_times_s)
    return (max(step_times_s) - low) / low if low > 0 else math.inf


@dataclass(frozen=True)
class Disturbance:
    """Why one block is disturbed: the side whose steps spread (`base` or `candidate`), its spread and the other
    side's ((max - min) / min step time within the image, fractions)."""

    side: str
    spread: float
    other_spread: float

    def __str__(self) -> str:
        other = "candidate" if self.side == "base" else "base"
        return f"{self.side}'s steps spread {self.spread:.1%} against the {other}'s {self.other_spread:.2%}"


def disturbance(base_step_times_s: Sequence[float], candidate_step_times_s: Sequence[float],
                policy: PairedPolicy = PairedPolicy()) -> Disturbance | None:
    """Whether one block is disturbed (module docs): a Disturbance (its text e.g. `candidate's steps spread 17.5 %
    against the base's 0.13 %`), else None (also for images of fewer than 2 steps, which show no spread, or with a
    step time that is not positive). Step times in seconds."""
    if min(len(base_step_times_s), len(candidate_step_times_s)) < 2 or \
            min(*base_step_times_s, *candidate_step_times_s) <= 0:
        return None
    spreads = {"base": _spread(base_step_times_s), "candidate": _spread(candidate_step_times_s)}
    wide = max(spreads, key=spreads.get)
    other = "candidate" if wide == "base" else "base"
    if spreads[wide] > policy.disturbed_spread and \
            spreads[wide] > policy.disturbed_factor * max(spreads[other], 0.001):
        return Disturbance(wide, spreads[wide], spreads[other])
    return None


@dataclass
class Blocks:
    """The blocks of one sequential comparison: `ratios` judged, `set_aside` (ratio, Disturbance) disturbed ones set
    aside: at most the policy's `max_disturbed` (later disturbed blocks are judged), and none once one side holds
    `lopsided` more of them than the other. Then every set-aside block is judged after all (`restored`): a neighbour's
    burst lands on either side, while disturbances that keep to one side may be that side's own (a candidate that
    stalls now and then), and setting them aside could turn its slowdown into SAME."""

    policy: PairedPolicy = PairedPolicy()
    ratios: list[float] = field(default_factory=list)
    set_aside: list[tuple[float, Disturbance]] = field(default_factory=list)
    restored: bool = False
    strata: list = field(default_factory=list)  # the case each judged block made (None: not known), as `ratios`
    set_aside_strata: list = field(default_factory=list)
    cases: int | None = None  # how many cases the blocks cycle through (None: not known)

    def add(self, ratio: float, disturbed: Disturbance | None = None, stratum=None) -> bool:
        """Take one block (`stratum`: the case it made, for `judge`'s by-case interval; None: not known); False when it
        is set aside (disturbed, room left), True when it is judged (with every block set aside before it, when this
        one makes them lopsided)."""
        if not disturbed or self.restored or len(self.set_aside) >= self.policy.max_disturbed:
            self.ratios.append(ratio)
            self.strata.append(stratum)
            return True
        self.set_aside.append((ratio, disturbed))
        self.set_aside_strata.append(stratum)
        sides = [d.side for _, d in self.set_aside]
        if abs(sides.count("base") - sides.count("candidate")) >= self.policy.lopsided:
            self.restored = True
            self.ratios.extend(r for r, _ in self.set_aside)
            self.strata.extend(self.set_aside_strata)
            return True
        return False

    def judge(self, out_of_budget: bool = False) -> PairedVerdict | None:
        """`judge` on the judged blocks, with one more condition: SAME needs `judge` on every block, the ones set aside
        included, to say SAME as well. Setting blocks aside may keep a burst from making SLOW or FAST or from hiding
        a slowdown, but never turns blocks that are unclear (or SLOW, or FAST) with them into SAME: until more blocks
        settle it this answers None, and UNKNOWN when no more can be measured (`out_of_budget` or `max_blocks`)."""
        verdict = judge(self.ratios, self.policy, out_of_budget, self.strata, self.cases)
        if verdict is None or verdict.outcome != SAME or not self.set_aside or self.restored:
            return verdict
        every = judge(self.ratios + [ratio for ratio, _ in self.set_aside], self.policy, out_of_budget=True,
                      strata=self.strata + self.set_aside_strata, cases=self.cases)
        if every.outcome == SAME:
            return verdict
        if len(self.ratios) < self.policy.max_blocks and not out_of_budget:
            return None
        return PairedVerdict(UNKNOWN, verdict.ratio, verdict.low, verdict.high, verdict.blocks,
                             f"UNKNOWN: candidate/base step time {verdict.ratio:.4f} ({verdict.ratio - 1:+.2%}), "
                             f"{self.policy.confidence:.1%} interval {verdict.low:.4f}-{verdict.high:.4f}, "
                             f"{verdict.blocks} blocks: SAME without the {len(self.set_aside)} disturbed block(s) set "
                             f"aside, {every.outcome} with them ({every.ratio - 1:+.2%})")

    def note(self) -> str:
        """`; 2 disturbed block(s) set aside (base's steps spread ...)`, the restored ones' line, or empty."""
        if not self.set_aside:
            return ""
        sides = [d.side for _, d in self.set_aside]
        if self.restored:
            side = max(("base", "candidate"), key=sides.count)
            return (f"; {len(sides)} disturbed block(s), {sides.count(side)} on the {side}'s side: judged, not set "
                    f"aside (disturbances that keep to one side may be its own; {self.set_aside[-1][1]})")
        return f"; {len(sides)} disturbed block(s) set aside ({self.set_aside[0][1]})"


@functools.lru_cache(maxsize=4096)
def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t quantile of `confidence` at `df` degrees of freedom (scipy), cached: the detection
    card's resampling (`fluxgate.showing.ab_card`) asks for the same few thousands of times."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def interval(ratios: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """(geometric mean, low, high) of the ratios: a Student-t interval on their logs, back-transformed. Needs 2+."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = t_quantile(confidence, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def by_case_interval(ratios: Sequence[float], strata: Sequence, confidence: float, cases: int | None = None
                     ) -> tuple[float, float, float, int] | None:
    """(geometric mean, low, high, cases) of the ratios with each case (`strata`: the case each block made) weighted
    alike: the mean over cases of each case's mean log ratio, its variance the sum of each case's variance of its
    mean over the number of cases squared, a Student-t interval at the Welch-Satterthwaite degrees of freedom (the
    cases' spreads and block counts may differ). None unless every block's case is known, 2+ cases were made (all
    `cases` of them, where given) and each holds 2+ blocks (a case left out would move the mean), and the blocks
    within the cases vary at all."""
    if len(strata) != len(ratios) or any(stratum is None for stratum in strata):
        return None
    groups: dict = {}
    for ratio, stratum in zip(ratios, strata):
        groups.setdefault(stratum, []).append(math.log(ratio))
    if len(groups) < max(2, cases or 0) or any(len(logs) < 2 for logs in groups.values()):
        return None
    mean = statistics.fmean(statistics.fmean(logs) for logs in groups.values())
    parts = [statistics.variance(logs) / len(logs) for logs in groups.values()]  # each case mean's variance
    if sum(parts) <= 0:
        return None
    df = sum(parts) ** 2 / sum(part ** 2 / (len(logs) - 1) for part, logs in zip(parts, groups.values()))
    half = t_quantile(confidence, max(1, int(df))) * math.sqrt(sum(parts)) / len(groups)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(groups)


def judge(ratios: Sequence[float], policy: PairedPolicy = PairedPolicy(), out_of_budget: bool = False,
          strata: Sequence | None = None, cases: int | None = None) -> PairedVerdict | None:
    """The verdict after these blocks' ratios, or None when another block should be measured. `out_of_budget`: no
    more blocks can be measured (time budget spent), so an unclear comparison is UNKNOWN now. `strata` (the case
    each block made): where the blocks' interval alone says neither SLOW nor FAST, the by-case interval
    (`by_case_interval`) may: a slowdown that comes on some cases only (a step cache that skips fewer steps on some
    prompts) spreads the blocks case by case, while each case keeps to its own ratio. `cases` (how many the blocks
    cycle through): no SAME before each of them was made, since a slowdown may sit on the one not made yet."""
    n = len(ratios)
    if n < max(2, policy.min_blocks):
        if out_of_budget:
            return PairedVerdict(UNKNOWN, ratios[0] if ratios else math.nan, math.nan, math.nan, n,
                                 f"{n} block(s) measured, at least {policy.min_blocks} needed: raise the time budget")
        return None
    ratio, low, high = interval(ratios, policy.confidence)
    shown = (f"candidate/base step time {ratio:.4f} ({ratio - 1:+.2%}), {policy.confidence:.1%} interval "
             f"{low:.4f}-{high:.4f}, {n} blocks")
    if low > 1 and ratio >= 1 + policy.min_effect:
        return PairedVerdict(SLOW, ratio, low, high, n, f"SLOW: {shown}")
    if high < 1 and ratio <= 1 - policy.min_effect:
        return PairedVerdict(FAST, ratio, low, high, n, f"FAST: {shown}")
    by_case = by_case_interval(ratios, strata, policy.confidence, cases) if strata is not None else None
    if by_case is not None:
        case_ratio, case_low, case_high, weighted = by_case
        case_shown = (f"candidate/base step time {case_ratio:.4f} ({case_ratio - 1:+.2%}) with {weighted} cases "
                      f"weighted alike, {policy.confidence:.1%} interval {case_low:.4f}-{case_high:.4f}, {n} blocks; "
                      f"over the blocks {ratio:.4f}, interval {low:.4f}-{high:.4f} (the cases differ)")
        if case_low > 1 and case_ratio >= 1 + policy.min_effect:
            return PairedVerdict(SLOW, case_ratio, case_low, case_high, n, f"SLOW: {case_shown}", weighted)
        if case_high < 1 and case_ratio <= 1 - policy.min_effect:
            return PairedVerdict(FAST, case_ratio, case_low, case_high, n, f"FAST: {case_shown}", weighted)
    every_case = not cases or strata is None or len({stratum for stratum in strata if stratum is not None}) >= cases
    if every_case and low > 1 - policy.equivalence and high < 1 + policy.equivalence:
        return PairedVerdict(SAME, ratio, low, high, n, f"SAME: {shown} (inside ±{policy.equivalence:.1%})")
    if n < policy.max_blocks and not out_of_budget:
        return None
    return PairedVerdict(UNKNOWN, ratio, low, high, n, f"UNKNOWN: {shown}; {_settles(ratios, policy)}")


def needs_second_load(verdict: PairedVerdict | None, policy: PairedPolicy) -> bool:
    """A SLOW or FAST verdict of one load whose shift is under the policy's `confirm_below`: `confirm` it on a second
    load of both sides."""
    return verdict is not None and verdict.outcome in (SLOW, FAST) and abs(verdict.ratio - 1) < policy.confirm_below


def confirm(first: PairedVerdict, second: PairedVerdict | None, policy: PairedPolicy,
            measure: str = "step time") -> PairedVerdict:
    """`first` (one load's verdict) after `second`, the same comparison on a second load of both sides (None: none
    was made: no time left, or a side failed). Unchanged unless `needs_second_load(first)`. Agreeing loads keep the
    outcome, shown with the load of the smaller shift (its ratio and interval) and both loads' blocks; a second load
    that does not show it is UNKNOWN (the shift is within the side bias one load can carry), at the two loads'
    geometric mean ratio (the first's where the second measured none), its message naming `measure` ("step time",
    "image time"); without a second load the verdict stands, saying it was not confirmed."""
    if not needs_second_load(first, policy):
        return first
    if second is None:
        return replace(first, message=f"{first.message}; not confirmed on a second load (none was made)")
    shift = f"{second.ratio - 1:+.2%}" if math.isfinite(second.ratio) else "no ratio"
    loads = (f"first load {first.ratio - 1:+.2%} ({first.outcome}{_by(first)}, {first.blocks} blocks), second load "
             f"{shift} ({second.outcome}{_by(second)}, {second.blocks} blocks)")
    if second.outcome == first.outcome:
        kept = min((first, second), key=lambda verdict: abs(verdict.ratio - 1))
        return replace(kept, blocks=first.blocks + second.blocks,
                       message=f"{kept.message}; on two loads of both sides: {loads}")
    ratio = math.sqrt(first.ratio * second.ratio) if math.isfinite(second.ratio) else first.ratio
    lows = [v.low for v in (first, second) if math.isfinite(v.low)]
    highs = [v.high for v in (first, second) if math.isfinite(v.high)]
    low, high = min(lows, default=math.nan), max(highs, default=math.nan)
    return PairedVerdict(UNKNOWN, ratio, low, high, first.blocks + second.blocks,
                         f"UNKNOWN: candidate/base {measure} {ratio:.4f} ({ratio - 1:+.2%}) over two loads of both "
                         f"sides: {loads}; a shift under {policy.confirm_below:.1%} that one load shows and another "
                         "does not is the side bias a load can carry")


def _by(verdict: PairedVerdict) -> str:
    """` by case, N cases` for a verdict the by-case interval decided (its ratio weights the cases alike), else
    empty."""
    return f" by case, {verdict.by_case} cases" if verdict.by_case else ""


def _settles(ratios: Sequence[float], policy: PairedPolicy) -> str:
    """What would settle an unclear comparison: the blocks its measured spread needs for an interval of ±equivalence
    (or, when the mean shift itself sits near a limit, that it is a shift of about that size)."""
    logs = [math.log(r) for r in ratios]
    spread = statistics.stdev(logs)
    shift = abs(statistics.fmean(logs))
    room = policy.equivalence - shift
    if room <= 0.25 * policy.equivalence:
        return (f"the shift ({math.exp(shift) - 1:.2%}) sits between the {policy.min_effect:.2%} effect and the "
                f"±{policy.equivalence:.1%} band: more blocks narrow it, or judge it as a shift of about that size")
    # The smallest n whose interval half-width, t(n-1) x spread / sqrt(n), fits in the room left: the Student-t
    # quantile, not the normal one, which understates n badly at the few blocks a GPU budget allows.
    needed = next((n for n in range(max(3, len(logs) + 1), 10_000)
                   if t_quantile(policy.confidence, n - 1) * spread / math.sqrt(n) < room), None)
    count = f"about {needed}" if needed else "over 10000"
    return f"the measured block spread ({spread:.2%}) needs {count} blocks: raise --ab-max-blocks or the budget"
