"""The gate's verdicts as a record stores them, written once by the gate and read by every reader (publish, the PR
summary, the dashboard, the card), which show them and never judge again.

- the fixed limits: the record's `outcome` (PASSED / FAILED) and `failures` (one line per limit missed);
- `HistoryVerdict`: the combo against the run history (`judging.compare`), with the policy it was judged by, its
  window and whether a re-measurement confirmed it (`Record.history_verdict`);
- `ABVerdict`: one combo of an A/B run (`fluxgate.ab`, `judging.paired`) (`Record.ab`).

The verdict names are defined here, the lowest layer; `judging.compare` uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

REGRESSION = "regression"
IMPROVEMENT = "improvement"
UNEXPLAINED_IMPROVEMENT = "improvement (unexplained, check)"
NO_CHANGE = "no change"
NOT_COMPARABLE = "not comparable"
HISTORY_OUTCOMES = (REGRESSION, UNEXPLAINED_IMPROVEMENT, IMPROVEMENT, NO_CHANGE, NOT_COMPARABLE)
AB_OUTCOMES = ("SAME", "SLOW", "FAST", "UNKNOWN")
NOT_RECORDED = "not recorded"  # a record without a stored verdict (written before verdicts were, or interrupted)


_OWN = {"extra", "present"}  # bookkeeping fields, never written


class _Stored:
    """A verdict as a record stores it: read from a checked JSON object (`storing.validate`) with unknown keys kept in
    `extra` and the keys read in `present`, written back with the keys it was read with (every field of one made
    here). Subclasses are frozen dataclasses with those two fields last."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        """From a record's checked verdict object."""
        names = {f.name for f in dataclasses.fields(cls)} - _OWN
        known = {key: value for key, value in data.items() if key in names}
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in known.items()},
                   extra={key: value for key, value in data.items() if key not in names}, present=frozenset(known))

    def to_json(self) -> dict[str, Any]:
        """The JSON object a record stores."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _OWN
               and (self.present is None or f.name in self.present)}
        return {**{key: list(value) if isinstance(value, tuple) else value for key, value in out.items()},
                **self.extra}


@dataclass(frozen=True)
class HistoryVerdict(_Stored):
    """One combo of one run against its window of earlier runs, as the gate judged it.

    `policy`: the `judging.compare.Policy` fields it was judged with (fractions; min_speed_effect 0.5 on CPU).
    `window_it_s` / `window_peak_mem_gib`: the window's median it/s and memory bound (GiB), the base of a report's Δ.
    `remeasured`: a suspected speed regression was measured again and `outcome` is the confirmed one.
    `gating`: a regression fails the run (`--history-gate on`, not writing baselines)."""

    outcome: str
    message: str = ""
    policy: Mapping[str, Any] = field(default_factory=dict)
    window_run_ids: Sequence[str] = ()
    window_it_s: float | None = None
    window_peak_mem_gib: float | None = None
    remeasured: bool = False
    gating: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    present: frozenset[str] | None = field(default=None, compare=False, repr=False)

    @property
    def fails_run(self) -> bool:
        """A regression that failed its run."""
        return self.outcome == REGRESSION and self.gating


@dataclass(frozen=True)
class ABVerdict(_Stored):
    """One combo of an A/B run: the paired verdict (SAME / SLOW / FAST / UNKNOWN) with the policy it was judged by.
    `ratio` (candidate / base mean step time), `low`..`high` its interval, `ratios` one per block, `orders` each
    block's side order ("bc"), `set_aside` [block number, why] pairs, `seconds` the time the blocks took; `image_*`
    the same for the whole image at the model's steps (`judging.interleave.image_s`; absent in runs before it);
    `loads` each block's load of both sides (absent in runs before 2026-12-07 22:00 UTC: all one load)."""

    outcome: str
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    blocks: int = 0
    message: str = ""
    mem_ratio: float | None = None
    ratios: Sequence[float] = ()
    orders: Sequence[str] = ()
    set_aside: Sequence[Sequence[Any]] = ()
    seconds: float | None = None
    alternating_loads: bool | None = None
    contention: str | None = None
    min_effect: float | None = None
    equivalence: float | None = None
    host_synchronous: bool | None = None
    image_outcome: str | None = None
    image_ratio: float | None = None
    image_low: float | None = None
    image_high: float | None = None
    image_message: str | None = None
    ms_ssim: float | None = None  # the lowest MS-SSIM of the candidate's images against the base's (same seed)
    loads: Sequence[int] = ()  # each block's load of both sides: 1, or 2 for a second load (`paired.confirm`)
    extra: Mapping[str, Any] = field(default_factory=dict)
    present: frozenset[str] | None = field(default=None, compare=False, repr=False)


def shown(record) -> str | None:
    """The verdict every reader shows for a record (a `storing.record.Record`): its history verdict, else its A/B
    verdict (`A/B SLOW`), else None (no verdict stored)."""
    if record.history_verdict is not None:
        return record.history_verdict.outcome
    if record.ab is not None:
        return f"A/B {record.ab.outcome}"
    return None
