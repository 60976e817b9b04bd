"""Regression verdicts against history: is a run's combo slower, heavier or less faithful than its recent past?

A pure library: history `Record`s in (as a `fluxgate.storing.store.HistoryStore` loads them), `Verdict`s out; no
I/O, no pytest. Every result depends only on the set of records given, never on their order.

Speed (`step_time_s`, from each record's per-step `step_times_s`) is a regression only when all three hold:

1. **Significant, by ranks.** A one-sided Mann-Whitney U test of the candidate's step times against the pooled
   step times of the window, p < `alpha` (0.01). Ranks, not a t-test: step times are right-skewed (on an
   H100, per-step CV 1.3-2 % with a tail up to +10 %: a preempted step, a clock dip), and a few slow steps would
   move a mean and inflate a standard deviation; ranks give a spike the weight of one step.
2. **Large enough to matter.** The Hodges-Lehmann shift (the median of every candidate-minus-window step
   difference) is at least `min_speed_effect` (2 %) of the window median.
3. **Beyond every window run.** The candidate's median is slower than the slowest run median in the window by
   more than `min_run_margin` (1 %) or the window's run-to-run spread, whichever is larger (the range of its run
   medians, scaled to what two runs would show by the control-chart constant d2). The U test treats the
   steps of one run as independent draws, but they are not: they share the process's offset (per-process medians
   on one H100 differ by up to 0.9 %; on two H100s of the same class, 2 % for bf16 and up to 6.5 % for the nvfp4
   dequantize fallback) and neighbouring steps are autocorrelated. With 28 steps a 1.5 % offset is already
   "significant" (p < 1e-3): in simulation the test alone flags 6-12 % of normal runs against two others. This check
   makes the run, not the step, the unit of evidence: a candidate inside the window's own run-to-run spread is
   never a regression, and a combo whose runs scatter by 4 % needs a 4 % move. Condition 2 is what carries the
   gate with a one-run window, where there is no spread to measure: give it two runs or more.

Improvement is the mirror image; an improvement of more than `unexplained_improvement` (10 %) is reported as
"improvement (unexplained, check)": a big speed-up in a gate more often means work was skipped than made faster.
A suspected speed regression is final only after `judging.confirm.confirm` sees it again in a re-measurement.

Peak memory (`peak_mem_gib`, one near-deterministic value per run) is a regression when it exceeds the window's
maximum by more than both `memory_tolerance` (2 %) and `memory_tolerance_gib` (0.25 GiB), an improvement when it
is below the window's minimum by as much. MS-SSIM (`ms_ssim`, deterministic for a given device and versions) is a
regression when it is below the window's minimum by more than `similarity_tolerance` (0.002), an improvement when
above its maximum by as much.

The whole image's time (`image_s`, from each record's `e2e_s`: text encoding, VAE decode and the pipeline's own work
besides the steps) is a regression when it exceeds the window's slowest run by more than `min_speed_effect` or the
window's own relative range, whichever is larger; like speed, it is final only after
`judging.confirm.confirm` sees it again.

Which runs a candidate is judged against (its window) is `fluxgate.judging.window`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from scipy import integrate
from scipy import stats as scipy_stats

from fluxgate.judging.window import (  # noqa: F401 - FIRST_RUN, COMPARABILITY_FIELDS, unfit_for_window re-exported
    COMPARABILITY_FIELDS,
    FIRST_RUN,
    contention,
    fingerprint_differences,
    no_window_reason,
    same_images,
    select_window,
    unfit_for_window,
)
from fluxgate.storing.record import REMEASURE, Metrics, Record  # noqa: F401 - REMEASURE re-exported
from fluxgate.storing.verdicts import (  # the names are the stored record's (storing.verdicts)
    IMPROVEMENT,
    HistoryVerdict,
    NO_CHANGE,
    NOT_COMPARABLE,
    REGRESSION,
    UNEXPLAINED_IMPROVEMENT,
)

# Worst first: a verdict's outcome is the worst of its metrics'.
_SEVERITY = (REGRESSION, UNEXPLAINED_IMPROVEMENT, IMPROVEMENT, NO_CHANGE)

@dataclass(frozen=True)
class Policy:
    """The decision rule's parameters; fractions are relative (0.02 = 2 %)."""

    alpha: float = 0.01  # one-sided Mann-Whitney U level per comparison
    min_speed_effect: float = 0.02  # Hodges-Lehmann shift of step time / window median
    min_run_margin: float = 0.01  # beyond the slowest (fastest) window run median, at least
    unexplained_improvement: float = 0.10  # a speed or memory gain beyond this asks for a human
    memory_tolerance: float = 0.02  # of the window's max (min)
    memory_tolerance_gib: float = 0.25  # and at least this many GiB
    similarity_tolerance: float = 0.002  # MS-SSIM units below the window's min (above its max)
    # A host-synchronous combo: its step makes the host wait for the GPU at least `host_synchronous_syncs` times (the
    # record's kernel_path.host_syncs_per_step), e.g. in every layer, so the GPU idles while the host launches and
    # the step time follows the host CPU; where its window runs were host-synchronous too, it is judged with the
    # larger minimum speed effect. Measured on the device H100 (diffusers 0.42.1): nvfp4 eager copies the FP4 lookup
    # table to the GPU in every linear call, 494 syncs per FLUX.1 step (270 Z-Image, 192 FLUX.2), and FLUX.1-dev
    # nvfp4 took 452 and 510 ms/step in runs of the same code on two fresh machines (+12.9 %); every bf16, fp8 and
    # gguf combo counted 0 and moved less than 1 %.
    host_synchronous_syncs: int = 8
    host_sync_min_speed_effect: float = 0.15


DEFAULT_POLICY = Policy()

# The minimum speed effect by device type. CUDA: the H100's run medians agree within 1 % (README, "Judging against
# history"). CPU: the tiny profile's 10-25 ms steps on a shared 2-core machine differ by up to ±25 % between runs of
# the same code (measured: bf16 14.05 -> 10.59 ms/step), so only a gross slowdown is a finding there.
MIN_SPEED_EFFECT = {"cuda": 0.02, "cpu": 0.50}


def min_speed_effect_for(device_type: str) -> float:
    return MIN_SPEED_EFFECT.get(device_type, MIN_SPEED_EFFECT["cpu"])


@dataclass(frozen=True)
class MetricVerdict:
    """One metric of one combo: candidate vs the window's median, in the metric's unit (named in `metric`).

    `relative_delta` = candidate / window - 1. `effect_size` is the quantity the rule's size threshold applies to:
    step time: Hodges-Lehmann shift / window median; memory: distance past the window's max (or min) / that bound;
    MS-SSIM: candidate minus the window's min (or max), in MS-SSIM units. `p_value` is set for step time only.
    """

    metric: str  # "step_time_s", "peak_mem_gib", "ms_ssim" or "image_s"
    outcome: str
    candidate: float | None
    window: float | None  # the window's value the candidate is compared with (median step time, max memory, ...)
    relative_delta: float | None
    p_value: float | None
    effect_size: float | None
    message: str


@dataclass(frozen=True)
class Verdict:
    """One combo of one run against its window."""

    combo: str
    run_id: str
    outcome: str
    metrics: tuple[MetricVerdict, ...] = ()
    reason: str = ""  # why "not comparable"
    notes: tuple[str, ...] = ()  # ignored fingerprint differences, confirmation
    window_run_ids: tuple[str, ...] = ()
    window_step_times_s: tuple[tuple[float, ...], ...] = ()  # per window run, sorted; `confirm` reuses them
    window_e2e_s: tuple[float | None, ...] = ()  # per window run with the same images: seconds per image
    policy: Policy = DEFAULT_POLICY

    def metric(self, name: str) -> MetricVerdict | None:
        return next((m for m in self.metrics if m.metric == name), None)

    def stored(self, gating: bool) -> HistoryVerdict:
        """This verdict as its record stores it (`storing.verdicts.HistoryVerdict`): outcome, message, the policy it
        was judged with, its window and the window's it/s and memory (the base of a report's Δ). `gating`: a
        regression fails the run (speed regressions were re-measured: `judging.confirm`)."""
        speed, memory = self.metric("step_time_s"), self.metric("peak_mem_gib")
        return HistoryVerdict(self.outcome, self.message, asdict(self.policy), tuple(self.window_run_ids),
                              window_it_s=1 / speed.window if speed and speed.window else None,
                              window_peak_mem_gib=memory.window if memory else None,
                              remeasured=any("re-measured" in note for note in self.notes), gating=gating)

    @property
    def message(self) -> str:
        """One line for a person: outcome, then why or per metric."""
        if self.outcome == NOT_COMPARABLE:
            return f"{self.combo}: {NOT_COMPARABLE} ({self.reason})"
        parts = [f"{m.metric} {m.message}" for m in self.metrics]
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return f"{self.combo}: {self.outcome} - " + "; ".join(parts) + notes


# ---- metrics ----

def _metric(metric: str, outcome: str, candidate, window, p_value, effect, message: str) -> MetricVerdict:
    delta = None if candidate is None or not window else candidate / window - 1
    return MetricVerdict(metric, outcome, candidate, window, delta, p_value, effect, message)


@lru_cache(maxsize=None)
def expected_range(k: int) -> float:
    """E[max - min] of k standard normal draws (the control-chart constant d2: 1.128 for 2, 2.326 for 5)."""
    def integrand(x: float) -> float:
        cdf = scipy_stats.norm.cdf(x)
        return 1.0 - cdf**k - (1.0 - cdf) ** k
    return float(integrate.quad(integrand, -np.inf, np.inf)[0])


def _run_to_run_spread(run_medians: np.ndarray) -> float:
    """The typical relative difference between two runs' medians, estimated from the window's range.

    The range of k run medians grows with k; scaling it by d2(2) / d2(k) gives what the range of two runs would be,
    so a longer window makes the rule sharper, not blunter. 0 for a single run."""
    k = len(run_medians)
    if k < 2:
        return 0.0
    relative_range = float((run_medians.max() - run_medians.min()) / np.median(run_medians))
    return relative_range * expected_range(2) / expected_range(k)


def speed_verdict(candidate_step_times_s: Sequence[float], window_runs_step_times_s: Sequence[Sequence[float]],
                  policy: Policy = DEFAULT_POLICY) -> MetricVerdict:
    """Step times (seconds) of one candidate run against the window's runs (one sequence of seconds per run)."""
    candidate = np.sort(np.asarray(candidate_step_times_s, dtype=np.float64))
    runs = [np.sort(np.asarray(run, dtype=np.float64)) for run in window_runs_step_times_s if len(run)]
    for times in (candidate, *runs):
        if not np.all(np.isfinite(times) & (times > 0)):
            raise ValueError(f"speed_verdict: step times must be finite and > 0 seconds, got {times.tolist()}")
    if candidate.size == 0 or not runs:
        missing = "candidate" if candidate.size == 0 else "window"
        return _metric("step_time_s", NOT_COMPARABLE, None, None, None, None, f"no step times in the {missing}")
    pooled = np.sort(np.concatenate(runs))
    base, cand = float(np.median(pooled)), float(np.median(candidate))
    shift = float(np.median(np.subtract.outer(candidate, pooled))) / base  # Hodges-Lehmann, relative
    run_medians = np.array([np.median(run) for run in runs])
    margin = max(policy.min_run_margin, _run_to_run_spread(run_medians))
    p_slower = float(scipy_stats.mannwhitneyu(candidate, pooled, alternative="greater").pvalue)
    p_faster = float(scipy_stats.mannwhitneyu(candidate, pooled, alternative="less").pvalue)
    slower = (p_slower < policy.alpha and shift >= policy.min_speed_effect
              and cand / run_medians.max() - 1 > margin)
    faster = (p_faster < policy.alpha and shift <= -policy.min_speed_effect
              and cand / run_medians.min() - 1 < -margin)
    if slower:
        outcome = REGRESSION
    elif faster:
        outcome = UNEXPLAINED_IMPROVEMENT if 1 - cand / base > policy.unexplained_improvement else IMPROVEMENT
    else:
        outcome = NO_CHANGE
    p_value = p_slower if shift >= 0 else p_faster
    message = (f"{outcome}: {cand / base - 1:+.1%} ({cand * 1e3:.2f} vs {base * 1e3:.2f} ms/step, median of "
               f"{len(runs)} run(s); {1 / cand:.3f} vs {1 / base:.3f} it/s), shift {shift:+.1%}, p={p_value:.2g}")
    if outcome == NO_CHANGE:
        message += (f" (flags at |shift| >= {policy.min_speed_effect:.1%} with p < {policy.alpha:g} and "
                    f"{margin:.1%} beyond every window run)")
    return _metric("step_time_s", outcome, cand, base, p_value, shift, message)


def memory_verdict(candidate_gib: float | None, window_gib: Sequence[float | None],
                   policy: Policy = DEFAULT_POLICY) -> MetricVerdict:
    """Peak memory (GiB) of the candidate against the window's runs."""
    window = sorted(v for v in window_gib if v is not None)
    if candidate_gib is None or not window:
        return _metric("peak_mem_gib", NOT_COMPARABLE, candidate_gib, None, None, None, "no peak memory to compare")
    low, high, base = window[0], window[-1], float(np.median(window))

    def margin(bound: float) -> float:
        return max(policy.memory_tolerance * bound, policy.memory_tolerance_gib)

    outcome, effect = _beyond_window(candidate_gib, low, high, high + margin(high), low - margin(low), policy)
    message = (f"{outcome}: {candidate_gib:.3f} GiB vs window {low:.3f}-{high:.3f} GiB "
               f"(tolerance {policy.memory_tolerance:.0%} and {policy.memory_tolerance_gib:g} GiB)")
    return _metric("peak_mem_gib", outcome, candidate_gib, base, None, effect, message)


def _beyond_window(value: float, low: float, high: float, upper: float, lower: float,
                   policy: Policy) -> tuple[str, float]:
    """(outcome, effect) of one value per run against the window's `low`..`high`: a regression above `upper` (effect
    relative to `high`), an improvement below `lower` (relative to `low`; unexplained past the policy's
    `unexplained_improvement`), else no change (effect 0)."""
    if value > upper:
        return REGRESSION, (value - high) / high
    if value < lower:
        effect = (value - low) / low
        return (UNEXPLAINED_IMPROVEMENT if -effect > policy.unexplained_improvement else IMPROVEMENT), effect
    return NO_CHANGE, 0.0


def similarity_verdict(candidate_ms_ssim: float | None, window_ms_ssim: Sequence[float | None],
                       policy: Policy = DEFAULT_POLICY) -> MetricVerdict:
    """MS-SSIM against the BF16 reference (1.0 = identical) of the candidate against the window's runs."""
    window = sorted(v for v in window_ms_ssim if v is not None)
    if candidate_ms_ssim is None or not window:
        return _metric("ms_ssim", NOT_COMPARABLE, candidate_ms_ssim, None, None, None, "no MS-SSIM of the same images (cases) to compare")
    low, high = window[0], window[-1]
    if candidate_ms_ssim < low - policy.similarity_tolerance:
        outcome, effect = REGRESSION, candidate_ms_ssim - low
    elif candidate_ms_ssim > high + policy.similarity_tolerance:
        outcome, effect = IMPROVEMENT, candidate_ms_ssim - high
    else:
        outcome, effect = NO_CHANGE, 0.0
    message = (f"{outcome}: {candidate_ms_ssim:.4f} vs window {low:.4f}-{high:.4f} "
               f"(tolerance {policy.similarity_tolerance:g})")
    return _metric("ms_ssim", outcome, candidate_ms_ssim, float(np.median(window)), None, effect, message)


def image_time_verdict(candidate_e2e_s: float | None, window_e2e_s: Sequence[float | None],
                       policy: Policy = DEFAULT_POLICY) -> MetricVerdict:
    """The whole image's time (`e2e_s`, seconds: the pipeline call, text encoding, denoising and VAE decode) of the
    candidate against the window's runs: a regression when it exceeds the window's slowest run by more than the
    minimum speed effect or the window's own relative range, whichever is larger (one value per run, so the run is
    the unit of evidence, as for memory); an improvement mirrored. What the steps' verdict cannot see lands here: a
    slower VAE decode, a new per-image cost."""
    window = sorted(v for v in window_e2e_s if v is not None and v > 0)
    if candidate_e2e_s is None or candidate_e2e_s <= 0 or not window:
        return _metric("image_s", NOT_COMPARABLE, candidate_e2e_s, None, None, None, "no image time to compare")
    low, high, base = window[0], window[-1], float(np.median(window))
    margin = max(policy.min_speed_effect, (high - low) / base)
    outcome, effect = _beyond_window(candidate_e2e_s, low, high, high * (1 + margin), low * (1 - margin), policy)
    message = (f"{outcome}: {candidate_e2e_s:.3f} s per image vs window {low:.3f}-{high:.3f} s (flags beyond "
               f"{margin:.1%} of the window's bound)")
    return _metric("image_s", outcome, candidate_e2e_s, base, None, effect, message)


def overall_outcome(metrics: Sequence[MetricVerdict]) -> str:
    outcomes = {m.outcome for m in metrics}
    return next((o for o in _SEVERITY if o in outcomes), NO_CHANGE)


# ---- run and combo ----

def compare_record(records: Iterable[Record], candidate: Record, *, last_n: int = 5, base_commit: str | None = None,
                   ignore_fields: Iterable[str] = (), policy: Policy = DEFAULT_POLICY) -> Verdict:
    """The verdict for one combo record of a run against its window in `records`. Raises ValueError for a
    bad window (`window.select_window`) or non-positive step times."""
    records, ignore_fields = list(records), tuple(ignore_fields)
    combo, run_id = str(candidate.combo), str(candidate.run_id)
    verdict = Verdict(combo, run_id, NOT_COMPARABLE, policy=policy)
    if not candidate.measured:
        why = candidate.error or "no measurement"
        return replace(verdict, reason=f"candidate run {run_id} has outcome {candidate.outcome}: {why}")
    window = select_window(records, candidate, last_n, base_commit, ignore_fields)
    if not window:
        return replace(verdict, reason=no_window_reason(records, candidate, base_commit, ignore_fields))
    policy, host_note = _policy_for(candidate, window, policy)
    ignored = [f"ignored {d}" for d in sorted({d for r in window for d in fingerprint_differences(
        r.environment, candidate.environment)})]
    window_steps = tuple(tuple(sorted(r.metrics.step_times_s or ())) for r in window)
    m = candidate.metrics
    metrics = (
        speed_verdict(m.step_times_s or (), window_steps, policy),
        memory_verdict(m.peak_mem_gib, [r.metrics.peak_mem_gib for r in window], policy),
        similarity_verdict(m.ms_ssim, [r.metrics.ms_ssim for r in window if same_images(r, candidate)], policy),
        image_time_verdict(m.e2e_s, [r.metrics.e2e_s for r in window if same_images(r, candidate)], policy),
    )
    # A contended candidate is still judged (a change that oversubscribes the cores must not switch off its own
    # judgement); the verdict says so, and a suspected regression is re-measured before it fails the run.
    contended = contention(candidate)
    host_note = host_note + ([f"{contended}: the speed verdict may be the host's, not the code's"] if contended else [])
    return replace(verdict, outcome=overall_outcome(metrics), metrics=metrics, notes=tuple(ignored + host_note),
                   policy=policy, window_run_ids=tuple(str(r.run_id) for r in window),
                   window_step_times_s=window_steps,
                   window_e2e_s=tuple(r.metrics.e2e_s for r in window if same_images(r, candidate)))


def host_syncs_per_step(record: Record) -> int | None:
    """The record's host syncs inside one step (from its kernel-path profile), or None when not measured."""
    return record.metrics.host_syncs_per_step


def is_host_synchronous(record: Record, policy: Policy = DEFAULT_POLICY) -> bool:
    """The record's step waits for the GPU at least `policy.host_synchronous_syncs` times."""
    syncs = host_syncs_per_step(record)
    return syncs is not None and syncs >= policy.host_synchronous_syncs


def _policy_for(candidate: Record, window: list[Record], policy: Policy) -> tuple[Policy, list[str]]:
    """`policy`, with the host-synchronous minimum speed effect where the candidate's step and every window run's
    waited for the GPU. A combo that became host-synchronous keeps `policy` (the new syncs may be the regression),
    with a note."""
    if not is_host_synchronous(candidate, policy):
        return policy, []
    syncs = host_syncs_per_step(candidate)
    if not all(is_host_synchronous(record, policy) for record in window):
        before = sorted({str(host_syncs_per_step(record)) for record in window})
        return policy, [f"host syncs per step rose to {syncs} (window runs: {', '.join(before)}); judged with "
                        f"the {policy.min_speed_effect:.0%} minimum effect"]
    if policy.min_speed_effect >= policy.host_sync_min_speed_effect:
        return policy, []
    note = (f"host-synchronous ({syncs} host syncs per step, as in its window runs): its speed follows the host "
            f"CPU, so a speed change must reach {policy.host_sync_min_speed_effect:.0%}")
    return replace(policy, min_speed_effect=policy.host_sync_min_speed_effect), [note]


def compare_run(records: Iterable[Record], run_id: str, *, last_n: int = 5, base_commit: str | None = None,
                ignore_fields: Iterable[str] = (), policy: Policy = DEFAULT_POLICY) -> list[Verdict]:
    """A verdict for every combo of run `run_id`, sorted by combo. Raises ValueError when the run has no records."""
    records = list(records)
    candidates = sorted((r for r in records if r.run_id == run_id and r.outcome != REMEASURE),
                        key=lambda r: str(r.combo))
    if not candidates:
        raise ValueError(f"run {run_id}: no records in the history given")
    return [compare_record(records, c, last_n=last_n, base_commit=base_commit, ignore_fields=ignore_fields,
                           policy=policy) for c in candidates]
