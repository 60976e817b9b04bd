"""A pytest plugin (`-p slow_combo`, with this folder on PYTHONPATH) that makes one combo slower the way a real
regression would, in its measurement and any re-measurement alike. It wraps `Runner.loaded`, which `Runner.measure`
and an A/B worker (`fluxgate.ab_worker`, which imports this module when told to) both use.

FLUXGATE_SLOW_COMBO: the combo id (`flux1-dev[gguf-q8_0]`), or `*` for every combo (each calibrated on its own first
step: recording real injected A/B blocks of a whole matrix for the detection card). FLUXGATE_SLOW_FRACTION: the
slowdown as a fraction of the combo's denoising loop at the model's own steps, the loop estimated from its first step
(so a mean effect of that fraction on the loop a user waits for), or FLUXGATE_SLOW_DELAY_S: a fixed delay per step.
FLUXGATE_SLOW_SHAPE, how the delay lands (CUDA: a GPU-side spin kernel in the stream, so it is timed like work; CPU:
a sleep; "host" busy-waits on the host on both):

- `steps` (default): every step, by the fraction of a step: a constant shift;
- `stallK` (e.g. `stall5`): every K-th step of each image, by K times that: a periodic stall or sync;
- `rstallK` (e.g. `rstall10`): each step with probability 1/K (a generator seeded by the combo id: the same stalls on
  every run), by K times that: a stall at random, as a collector or an allocator makes one;
- `host`: every step, on the host before the step's end is marked: added host time, which only a host-bound combo
  (its GPU waits for launches) shows; a GPU-bound one hides it behind its queue;
- `first`: each image's first step, by the fraction of the whole loop: a new warm-up cost (the A/B's image verdict),
  from the combo's first image on (its first step, ending, calibrates the combo: one wait for the device, so on CUDA
  that image's second step starts on an empty queue: a few launch latencies on one candidate step of the combo);
- `decode`: each image's VAE decode, by the fraction of the whole loop: time outside the loop (the image verdict);
- `caseN` (e.g. `case0`): every step of the images of the combo's N-th case (0-based, the fixture's order) only, by
  the number of cases times the fraction: a slowdown on some prompts (a step cache that skips fewer steps for them),
  the same mean over a cycle of the cases. Images made several cases to a call count through them in order.

FLUXGATE_SLOW_PLAN (JSON `{"flux1-dev[bf16]": [0.02, "stall5"], ...}`), over FLUXGATE_SLOW_COMBO and its FRACTION
and SHAPE: several combos, each with its own fraction and shape (`fluxgate ab --inject-slow` with a comma-separated
list). A `caseN` beyond the combo's cases is a ValueError when its images are made.

FLUXGATE_SLOW_MARK: a file created when the combo's first slowed step starts (a test that interrupts the combo
mid-measurement waits for it).
"""

import json
import os
import random
import re
import time
from pathlib import Path

import torch

from fluxgate.measuring import measure, runner

DELAY_S = float(os.environ.get("FLUXGATE_SLOW_DELAY_S", "0"))
MARK = os.environ.get("FLUXGATE_SLOW_MARK")
SHAPES = ("steps", "host", "first", "decode")


def _entry(fraction, shape: str) -> tuple[float, str, int]:
    stall = re.fullmatch(r"r?stall([2-9]|[1-9][0-9]+)", shape)
    case = re.fullmatch(r"case(0|[1-9][0-9]*)", shape)
    if shape not in SHAPES and not stall and not case:
        raise ValueError(f"slow_combo shape {shape!r}: want one of {', '.join(SHAPES)}, stallK or rstallK (K >= 2) "
                         "or caseN")
    return float(fraction), shape, int((stall or case).group(1)) if stall or case else 1


# combo id (or "*") -> (fraction, shape, K of stallK / rstallK or N of caseN, else 1). FLUXGATE_SLOW_PLAN (JSON,
# {combo: [fraction, shape]}): several combos, each its own shape (one A/B run carrying every shape); else
# FLUXGATE_SLOW_COMBO with the FRACTION and SHAPE above.
if os.environ.get("FLUXGATE_SLOW_PLAN"):
    PLAN = {combo: _entry(*entry) for combo, entry in json.loads(os.environ["FLUXGATE_SLOW_PLAN"]).items()}
else:
    PLAN = {os.environ["FLUXGATE_SLOW_COMBO"]: _entry(os.environ.get("FLUXGATE_SLOW_FRACTION", "0"),
                                                      os.environ.get("FLUXGATE_SLOW_SHAPE", "steps"))}
state = {"active": False, "first_step_s": None, "calibrated_for": None, "model_steps": 1, "step": 0,
         "fraction": 0.0, "shape": "steps", "every": 1, "cases": None, "image": -1}
original_loaded, original_step_end = runner.Runner.loaded, measure._StepClock.step_end
original_images = runner.Loaded.images


class _Slowed:
    """`Runner.loaded(combo)`, with the combo slowed while it is loaded when it is the target."""

    def __init__(self, held, combo, model_steps: int):
        self.held, self.combo, self.model_steps = held, combo, model_steps

    def __enter__(self):
        entry = PLAN.get(self.combo.id) or PLAN.get("*")
        state["active"] = entry is not None
        if entry:
            state["fraction"], state["shape"], state["every"] = entry
        state["model_steps"] = self.model_steps
        if state["calibrated_for"] != self.combo.id:  # each combo's fraction is of its own first step
            state["first_step_s"], state["calibrated_for"] = None, self.combo.id
        try:
            held = self.held.__enter__()
        except BaseException:
            state["active"] = False
            raise
        if state["active"] and state["shape"] == "decode":
            _slow_decode(held.pipe.vae)
        return held

    def __exit__(self, *exc):
        state["active"] = False
        return self.held.__exit__(*exc)


def loaded(self, combo):
    return _Slowed(original_loaded(self, combo), combo, combo.model_spec.settings(self.profile).steps)


def images(self, count: int = 1, steps=None, first: int = 0):
    """`Loaded.images`, telling `step_end` which case each image of the call makes (the `caseN` shape): numbers of
    the fixture's cases, in order from `first`; warm-up images (made outside it) are no case."""
    shape = state["shape"] if state["active"] else ""
    if shape.startswith("case") and state["every"] >= len(self.cases):
        raise ValueError(f"slow_combo shape {shape}: {self.combo.id} has {len(self.cases)} cases (0 to "
                         f"{len(self.cases) - 1})")
    state["cases"] = [((first + index) % len(self.cases), len(self.cases)) for index in range(count)]
    state["image"] = -1
    try:
        return original_images(self, count, steps, first)
    finally:
        state["cases"] = None


def _spin(seconds: float, cuda: bool, host: bool = False) -> None:
    if MARK:
        Path(MARK).touch()
    if host:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    elif cuda:
        properties = torch.cuda.get_device_properties(0)
        clock_hz = properties.clock_rate * 1000 if hasattr(properties, "clock_rate") else 1.98e9
        torch.cuda._sleep(int(seconds * clock_hz))
    else:
        time.sleep(seconds)


def _step_s(clock) -> float:
    """The combo's first step (seconds), measured once on an unslowed step."""
    if state["first_step_s"] is None and len(clock.marks) >= 2:
        first, second = clock.marks[0], clock.marks[1]
        if clock.cuda:
            second.synchronize()
            state["first_step_s"] = first.elapsed_time(second) / 1000
        else:
            state["first_step_s"] = second - first
    return state["first_step_s"] or 0.0


def _first_step_now(clock) -> float:
    """The combo's first step, ending now (the `first` shape's calibration: a warm-up cost is there from the combo's
    first image, as a real one would be). Waits for the device once per combo."""
    if clock.cuda:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        state["first_step_s"] = clock.marks[0].elapsed_time(end) / 1000
    else:
        state["first_step_s"] = time.perf_counter() - clock.marks[0]
    return state["first_step_s"]


def _slow_decode(vae) -> None:
    """Wrap the VAE's decode once: the VAE is shared by a model's precisions (`Runner._shared_components`), and a
    wrapper per load would stack their delays."""
    if getattr(vae.decode, "slowed_by_injector", False):
        return
    decode = vae.decode

    def slowed(*args, **kwargs):
        if state["active"] and state["shape"] == "decode" and state["first_step_s"]:
            _spin(state["fraction"] * state["first_step_s"] * state["model_steps"], torch.cuda.is_available())
        return decode(*args, **kwargs)

    slowed.slowed_by_injector = True
    vae.decode = slowed


def _random() -> random.Random:
    """The `rstallK` shape's generator, seeded by the combo id (the same stalls on every run of it)."""
    if state.get("random_for") != state["calibrated_for"]:
        state["random"], state["random_for"] = random.Random(str(state["calibrated_for"])), state["calibrated_for"]
    return state["random"]


def step_end(self, *args):
    step = len(self.marks)  # the number of the step ending now (the loop's start is the first mark)
    if state["active"]:
        step_s = _step_s(self)  # calibrated on the combo's first image's first step, never slowed
        fraction, shape, every = state["fraction"], state["shape"], state["every"]
        if shape == "decode":
            pass
        elif DELAY_S or not fraction:
            if step >= 2:
                _spin(DELAY_S, self.cuda)
        elif shape == "first":
            if step == 1:  # every image's first step (its end event comes after the spin), the first one's too
                _spin(fraction * (step_s or _first_step_now(self)) * state["model_steps"], self.cuda)
        elif shape.startswith("rstall"):
            if step >= 2 and _random().random() < 1 / every:
                _spin(every * fraction * step_s, self.cuda, host=False)
        elif shape.startswith("case"):
            if step == 1:
                state["image"] += 1
            cases = state["cases"]
            if step >= 2 and cases and state["image"] < len(cases) and cases[state["image"]][0] == every:
                _spin(cases[state["image"]][1] * fraction * step_s, self.cuda)
        elif step >= 2 and step % every == 0:
            _spin(every * fraction * step_s, self.cuda, host=shape == "host")
    return original_step_end(self, *args)


runner.Runner.loaded, measure._StepClock.step_end, runner.Loaded.images = loaded, step_end, images
