"""Step-time statistics: numbers only, from a list of step durations in seconds.

Step times are right-skewed (a GPU step sometimes takes +10 %, never -10 %), so the robust figures (median, IQR,
low quantiles, the IQR-based CV) are the ones a verdict should rest on; mean and std are kept for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

# IQR of a normal distribution in units of its standard deviation: IQR / 1.349 estimates sigma robustly.
NORMAL_IQR_PER_SIGMA = 1.349


@dataclass(frozen=True)
class StepStats:
    """Summary of `n` step times; every `*_s` field is in seconds, the CVs are fractions (0.02 = 2 %)."""

    n: int
    median_s: float
    iqr_s: float
    mean_s: float
    std_s: float | None  # sample standard deviation (ddof=1); None for a single step
    min_s: float
    p10_s: float
    p90_s: float
    max_s: float
    cv: float | None  # std / mean; None for a single step
    robust_cv: float  # (IQR / 1.349) / median: the std a normal distribution with this IQR would have, per median

    @property
    def median_it_s(self) -> float:
        """Steps per second at the median step time."""
        return 1.0 / self.median_s

    def to_json(self) -> dict:
        return {**asdict(self), "median_it_s": self.median_it_s}


def step_stats(step_times_s: list[float]) -> StepStats:
    """Summarise step durations (seconds, at least one, all finite and positive)."""
    times = np.asarray(step_times_s, dtype=np.float64)
    if times.size == 0:
        raise ValueError("step_stats: no step times to summarise")
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"step_stats: step times must be finite and > 0 seconds, got {times.tolist()}")
    median = float(np.median(times))
    mean = float(times.mean())
    iqr = float(scipy_stats.iqr(times))
    std = float(times.std(ddof=1)) if times.size > 1 else None
    p10, p90 = (float(q) for q in np.percentile(times, [10, 90]))
    return StepStats(
        n=int(times.size), median_s=median, iqr_s=iqr, mean_s=mean, std_s=std, min_s=float(times.min()),
        p10_s=p10, p90_s=p90, max_s=float(times.max()), cv=None if std is None else std / mean,
        robust_cv=iqr / NORMAL_IQR_PER_SIGMA / median,
    )


SPIKE_THRESHOLD = 0.10  # a step this much over the median is a spike


HOST_PAUSE, HOST_BOUND, SERIALIZED, OTHER = "host pause", "host-bound", "not separable", "other"


@dataclass(frozen=True)
class Spikes:
    """The steps at least `threshold` over the median (0-based indexes) and what each was waiting for:
    "host pause" (the main thread's off-CPU time exceeded its usual, the median step's, by at least half the step's
    excess: preempted, waiting for the GIL, sleeping); "host-bound" (CUDA: the GPU had nothing queued at the end of
    this step, unlike most steps, so it had been waiting for the host); "not separable" (CUDA: the GPU was idle at
    most step ends, as with a sync inside every step, so host and GPU take turns and either may have been slower);
    "other" (the thread ran and, on CUDA, the GPU was still busy at the step's end: longer kernels or more host
    work)."""

    threshold: float
    steps: list[int]
    causes: list[str]  # one per spiking step
    max_excess: float  # the slowest step over the median, as a fraction
    idle_total: int | None  # CUDA: steps (of all) whose end found the GPU idle; None on CPU
    n: int

    def describe(self) -> str | None:
        """One line for the run summary, or None when no step spiked."""
        if not self.steps:
            return None
        counts = {cause: self.causes.count(cause) for cause in (HOST_PAUSE, HOST_BOUND, SERIALIZED, OTHER)}
        meaning = {HOST_PAUSE: "main thread off the CPU", HOST_BOUND: "GPU idle at the step's end",
                   SERIALIZED: "GPU idle at most step ends: host and GPU take turns",
                   OTHER: "thread on the CPU" + (", GPU busy at the step's end" if self.idle_total is not None else "")}
        parts = [f"{count} {cause} ({meaning[cause]})" for cause, count in counts.items() if count]
        line = (f"{len(self.steps)} of {self.n} steps ≥{self.threshold:.0%} over the median "
                f"(slowest +{self.max_excess:.0%}): {', '.join(parts)}")
        return line if self.idle_total is None else f"{line}; GPU idle at {self.idle_total} of {self.n} step ends"

    def to_json(self) -> dict:
        return asdict(self)


def spikes(step_times_s: list[float], off_cpu_s: list[float] | None = None, gpu_idle_at_end: list[bool] | None = None,
           threshold: float = SPIKE_THRESHOLD) -> Spikes:
    """Which steps spiked and what each was waiting for, from the main thread's off-CPU seconds per step and (CUDA)
    whether the GPU was idle at each step's end; lists that do not line up with the steps are not used."""
    times = np.asarray(step_times_s, dtype=np.float64)
    median = float(np.median(times))
    over = times / median - 1
    steps = [int(i) for i in np.flatnonzero(over >= threshold)]
    off_cpu = np.asarray(off_cpu_s, dtype=np.float64) if off_cpu_s is not None and len(off_cpu_s) == times.size else None
    idle = gpu_idle_at_end if gpu_idle_at_end is not None and len(gpu_idle_at_end) == times.size else None
    usual_off_cpu = float(np.median(off_cpu)) if off_cpu is not None else 0.0
    idle_total = sum(map(bool, idle)) if idle is not None else None
    serialized = _mostly_idle(idle_total, int(times.size))

    def cause(i: int) -> str:
        if off_cpu is not None and off_cpu[i] - usual_off_cpu >= 0.5 * (times[i] - median):
            return HOST_PAUSE
        if serialized:
            return SERIALIZED
        return HOST_BOUND if idle is not None and idle[i] else OTHER

    return Spikes(threshold=threshold, steps=steps, causes=[cause(i) for i in steps], max_excess=float(over.max()),
                  idle_total=idle_total, n=int(times.size))


def mostly_idle(found: Spikes) -> bool:
    """CUDA: the GPU was idle at the end of most steps (it waits for the host: a sync in every step, or launches)."""
    return _mostly_idle(found.idle_total, found.n)


def _mostly_idle(idle_total: int | None, n: int) -> bool:
    return idle_total is not None and idle_total > n / 2


# A combo whose main thread waited this share of its step time for a CPU (runnable, not running; median over the
# steps) ran on cores other work held. Measured with the tiny profile on a 2-core machine, one torch thread: 0.0 %
# of each step alone (all 16 combos), 15-31 % beside two busy loops (z-image-turbo, steps 1.5-3.5x slower). On the
# H200 runs (before this was recorded) the main thread's off-CPU time was 0.0-0.2 % of each step.
HOST_CONTENTION = 0.10


def run_wait_share(step_times_s: list[float] | None, run_wait_s: list[float] | None) -> float | None:
    """Median run-queue wait / median step time over one combo's timed steps (0 = never kept from a CPU), or None
    when either list is missing or they do not line up."""
    if not step_times_s or not run_wait_s or len(step_times_s) != len(run_wait_s):
        return None
    median_step = float(np.median(np.asarray(step_times_s, dtype=np.float64)))
    return float(np.median(np.asarray(run_wait_s, dtype=np.float64))) / median_step if median_step > 0 else None


def contention_note(step_times_s: list[float] | None, run_wait_s: list[float] | None) -> str | None:
    """`host contention: ...` when one combo's steps (seconds each) waited for a CPU (`run_wait_s`, seconds per
    step) at least `HOST_CONTENTION` of the time, else None (also when either list is missing). Time the code itself
    spends sleeping or blocked is not contention and does not count."""
    share = run_wait_share(step_times_s, run_wait_s)
    if share is None or share < HOST_CONTENTION:
        return None
    return (f"host contention: the main thread waited for a CPU {share:.0%} of each step (median; "
            f"{HOST_CONTENTION:.0%} or more means other work held these cores)")
