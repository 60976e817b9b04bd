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


@dataclass(frozen=True)
class Spikes:
    """The steps at least `threshold` over the median (0-based indexes), and, on CUDA, which of them the host made
    slow: in a host-bound step the GPU had caught up with the host (its queue ran dry), so the step took as long as
    the host took to enqueue it (a Python pause, a preempted thread, a sync inside the step) rather than because its
    kernels ran longer."""

    threshold: float
    steps: list[int]
    max_excess: float  # the slowest step over the median, as a fraction
    host_bound: list[int] | None  # the spikes that were host-bound; None without the information (CPU)
    host_bound_total: int | None  # host-bound steps among all the steps
    n: int

    def describe(self) -> str | None:
        """One line for the run summary, or None when no step spiked."""
        if not self.steps:
            return None
        line = (f"{len(self.steps)} of {self.n} steps ≥{self.threshold:.0%} over the median "
                f"(slowest +{self.max_excess:.0%})")
        if self.host_bound is None:
            return line
        cause = ("host-bound: the GPU had run dry waiting for the host" if len(self.host_bound) == len(self.steps)
                 else "GPU-side: the GPU was still busy with earlier steps, so its kernels ran longer"
                 if not self.host_bound else f"{len(self.host_bound)} of them host-bound, the rest GPU-side")
        return f"{line}; {cause} ({self.host_bound_total} of {self.n} steps host-bound in all)"

    def to_json(self) -> dict:
        return asdict(self)


def spikes(step_times_s: list[float], queue_drained: list[bool] | None = None,
           threshold: float = SPIKE_THRESHOLD) -> Spikes:
    """Which steps spiked, and (given the per-step queue-drained flags) which of those were host-bound."""
    times = np.asarray(step_times_s, dtype=np.float64)
    median = float(np.median(times))
    over = times / median - 1
    steps = [int(i) for i in np.flatnonzero(over >= threshold)]
    known = queue_drained is not None and len(queue_drained) == times.size
    return Spikes(threshold=threshold, steps=steps, max_excess=float(over.max()),
                  host_bound=[i for i in steps if queue_drained[i]] if known else None,
                  host_bound_total=sum(map(bool, queue_drained)) if known else None, n=int(times.size))
