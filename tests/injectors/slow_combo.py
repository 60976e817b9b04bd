"""A pytest plugin (`-p slow_combo`, with this folder on PYTHONPATH) that makes one combo's denoising steps slower,
the way a real regression would, in its measurement and any re-measurement alike. It wraps `Runner.loaded`, which
`Runner.measure` and an A/B worker (`fluxgate.measuring.ab_worker`, which imports this module when told to) both use.

FLUXGATE_SLOW_COMBO: the combo id (`flux1-dev[gguf-q8_0]`), or `*` for every combo (each calibrated on its own first
step: recording real injected A/B blocks of a whole matrix for the detection card). FLUXGATE_SLOW_FRACTION: slow each step by this fraction
of the combo's first step (CUDA: a GPU-side spin kernel, so it lands in the event-timed stream; CPU: a sleep), or
FLUXGATE_SLOW_DELAY_S: a fixed delay per step. FLUXGATE_SLOW_MARK: a file created when the combo's first slowed step
starts (a test that interrupts the combo mid-measurement waits for it).
"""

import os
import time
from pathlib import Path

import torch

from fluxgate.measuring import measure, runner

TARGET = os.environ["FLUXGATE_SLOW_COMBO"]
FRACTION = float(os.environ.get("FLUXGATE_SLOW_FRACTION", "0"))
DELAY_S = float(os.environ.get("FLUXGATE_SLOW_DELAY_S", "0"))
MARK = os.environ.get("FLUXGATE_SLOW_MARK")
state = {"active": False, "first_step_s": None, "calibrated_for": None}
original_loaded, original_step_end = runner.Runner.loaded, measure._StepClock.step_end


class _Slowed:
    """`Runner.loaded(combo)`, with the combo's steps slowed while it is loaded when it is the target."""

    def __init__(self, held, combo):
        self.held, self.combo = held, combo

    def __enter__(self):
        state["active"] = TARGET in ("*", self.combo.id)
        if state["calibrated_for"] != self.combo.id:  # each combo's fraction is of its own first step
            state["first_step_s"], state["calibrated_for"] = None, self.combo.id
        try:
            return self.held.__enter__()
        except BaseException:
            state["active"] = False
            raise

    def __exit__(self, *exc):
        state["active"] = False
        return self.held.__exit__(*exc)


def loaded(self, combo):
    return _Slowed(original_loaded(self, combo), combo)


def _delay_s(clock) -> float:
    if DELAY_S or not FRACTION:
        return DELAY_S
    if state["first_step_s"] is None and len(clock.marks) >= 2:  # calibrate once on an unslowed step
        first, second = clock.marks[0], clock.marks[1]
        if clock.cuda:
            second.synchronize()
            state["first_step_s"] = first.elapsed_time(second) / 1000
        else:
            state["first_step_s"] = second - first
    return FRACTION * (state["first_step_s"] or 0.0)


def step_end(self, *args):
    if state["active"] and len(self.marks) >= 2:
        delay = _delay_s(self)
        if MARK:
            Path(MARK).touch()
        if self.cuda:
            clock_hz = torch.cuda.get_device_properties(0).clock_rate * 1000 if hasattr(
                torch.cuda.get_device_properties(0), "clock_rate") else 1.98e9
            torch.cuda._sleep(int(delay * clock_hz))
        else:
            time.sleep(delay)
    return original_step_end(self, *args)


runner.Runner.loaded, measure._StepClock.step_end = loaded, step_end
