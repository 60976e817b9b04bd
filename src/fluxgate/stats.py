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
