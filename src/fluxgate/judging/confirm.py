"""A history verdict's second look (`fluxgate.judging.compare` gives the first): a suspected speed or image-time
regression is final only when a fresh process's re-measurement shows it too (`confirm`); a run whose measurement
and re-measurement both waited for a CPU has its times not judged (`speed_not_judged`). Pure: no I/O."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from fluxgate.judging.compare import (
    IMPROVEMENT,
    NO_CHANGE,
    NOT_COMPARABLE,
    REGRESSION,
    UNEXPLAINED_IMPROVEMENT,
    Verdict,
    overall_outcome,
    image_time_verdict,
    speed_verdict,
)


def _confirm_image(first: Verdict, remeasured_e2e_s: float | None) -> Verdict:
    """`first` with its image-time regression kept only if the re-measurement's image time is one too (against the
    same window); unchanged without a re-measured image time or an image regression."""
    image = first.metric("image_s")
    if remeasured_e2e_s is None or image is None or image.outcome != REGRESSION:
        return first
    again = image_time_verdict(remeasured_e2e_s, first.window_e2e_s, first.policy)
    agreed = again.outcome == REGRESSION
    combined = replace(image, outcome=REGRESSION if agreed else NO_CHANGE,
                       effect_size=min(image.effect_size, again.effect_size, key=abs) if agreed else 0.0,
                       message=f"{REGRESSION if agreed else NO_CHANGE} ({'confirmed' if agreed else 'not confirmed'} "
                               f"by re-measurement): first {image.message}; re-measured {again.message}")
    metrics = tuple(combined if m.metric == "image_s" else m for m in first.metrics)
    return replace(first, outcome=overall_outcome(metrics), metrics=metrics,
                   notes=(*first.notes, "image time re-measured against the same window"))


def confirm(first: Verdict, remeasured_step_times_s: Sequence[float],
            base_step_times_s: Sequence[Sequence[float]] | None = None,
            remeasured_e2e_s: float | None = None) -> Verdict:
    """Keep `first`'s speed regression (or improvement) only if a re-measurement shows it too; with
    `remeasured_e2e_s` (seconds per image), its image-time regression likewise.

    `remeasured_step_times_s`: the candidate's step times (seconds) from a fresh process. `base_step_times_s`: one
    sequence per base run measured alongside it (ideally interleaved, base/candidate/base/..., on the same machine
    so that drift hits both); without it the re-measurement is judged against `first`'s window. Both measurements
    must clear the whole rule on their own rather than be pooled: pooling would let one process's offset carry the
    other, while two independent processes each landing beyond the window is what a real change looks like. The
    combined p-value is the larger of the two (an intersection-union test) and the effect the smaller shift.
    """
    first = _confirm_image(first, remeasured_e2e_s)
    speed = first.metric("step_time_s")
    if first.outcome == NOT_COMPARABLE or speed is None or speed.outcome == NOT_COMPARABLE:
        return first
    window = first.window_step_times_s if base_step_times_s is None else base_step_times_s
    again = speed_verdict(remeasured_step_times_s, window, first.policy)
    agreed = speed.outcome != NO_CHANGE and _direction(again.outcome) == _direction(speed.outcome)
    outcome = speed.outcome if agreed else NO_CHANGE
    p_values = [p for p in (speed.p_value, again.p_value) if p is not None]
    shifts = [s for s in (speed.effect_size, again.effect_size) if s is not None]
    word = "confirmed" if agreed else ("not confirmed" if speed.outcome != NO_CHANGE else "still no change")
    combined = replace(again, outcome=outcome, p_value=max(p_values) if p_values else None,
                       effect_size=min(shifts, key=abs) if shifts else None,
                       message=f"{outcome} ({word} by re-measurement): first {speed.message}; re-measured "
                               f"{again.message}")
    metrics = tuple(combined if m.metric == "step_time_s" else m for m in first.metrics)
    against = "interleaved base runs" if base_step_times_s is not None else "the same window"
    return replace(first, outcome=overall_outcome(metrics), metrics=metrics,
                   notes=(*first.notes, f"speed re-measured against {against}"))


TIMES = ("step_time_s", "image_s")  # the metrics host contention stretches


def speed_not_judged(verdict: Verdict, why: str) -> Verdict:
    """`verdict` with its times (`TIMES`: the steps and the whole image) not judged (NOT_COMPARABLE, `why` in their
    messages), memory and similarity as they are: a CPU run whose measurement and re-measurement both waited for a
    CPU says nothing of the code's speed."""
    metrics = tuple(replace(m, outcome=NOT_COMPARABLE, message=f"not judged: {why} ({m.message})")
                    if m.metric in TIMES else m for m in verdict.metrics)
    if metrics == verdict.metrics:
        return verdict
    return replace(verdict, outcome=overall_outcome(metrics), metrics=metrics, notes=(*verdict.notes, f"speed: {why}"))


def _direction(outcome: str) -> str:
    return IMPROVEMENT if outcome in (IMPROVEMENT, UNEXPLAINED_IMPROVEMENT) else outcome
