"""Measuring one image: per-step denoising times, end-to-end seconds, peak memory.

Step times are taken without a host sync inside the denoising loop: on CUDA each boundary records an event
(`torch.cuda.Event`), and the events are read after the pipeline returns; on CPU the boundaries are
`time.perf_counter()` stamps (CPU work is synchronous).

What a spiking step was waiting for (`stats.spikes`): each boundary also notes the main thread's CPU time
(`time.thread_time()`), so a step's wall time minus its CPU time is how long the thread was off the CPU (preempted,
waiting for the GIL, sleeping): a host pause. On CUDA each boundary's event is then polled (`cudaEventQuery`, which
does not wait) for as long as an event recorded on an idle GPU takes to complete, measured before each combo's
timed images (`idle_probe_s`, at least 20 µs): an event that completes within it found the GPU with nothing
queued, i.e. the GPU was waiting for the host at the end of the step; a GPU with queued work is still busy then. The poll costs at most
that long per step, a few µs when the GPU is idle. A step is one pass of the denoising loop (transformer
forward + scheduler step), from the first transformer call or the previous step's end to this step's end: the
pipeline's `callback_on_step_end`, or the legacy `callback` of pipelines that still take only that (PixArt's).

Memory: on CUDA, torch's max allocated and max reserved bytes during the timed images, and NVML's per-process
used memory (in `telemetry`, sampled with clocks, power, temperature, throttle reasons and energy); on CPU there is no VRAM, so
the peak resident set size of the whole process, sampled every 5 ms during the timed image, is reported instead
(`mem_kind` says which).
"""

from __future__ import annotations

import gc
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxgate.errors import FluxgateError
from fluxgate.measuring import telemetry
from fluxgate.models import denoiser_of
from fluxgate.stats import Spikes, StepStats, spikes, step_stats

GIB = 1024**3
IDLE_PROBE_MIN_S, IDLE_PROBE_MAX_S = 20e-6, 500e-6  # bounds of the per-run idle probe (`idle_probe_s`)


@dataclass
class Measurement:
    """The measurements of one timed image."""

    step_times_s: list[float]
    e2e_s: float
    peak_mem_gib: float
    mem_kind: str  # "cuda_max_allocated" or "process_rss_peak"
    peak_reserved_gib: float | None
    image: Any = field(repr=False)  # PIL.Image.Image
    telemetry: telemetry.Telemetry | None = None  # NVML samples during the timed images (unavailable on CPU)
    kernel_path: dict | None = None  # which GEMM path the quantized layers ran (kernels.KernelPath.to_json())
    step_flops: float | None = None  # model FLOPs of one denoising step (same for every precision of a model)
    denoise_peak_gib: float | None = None  # CUDA: peak allocated during the denoising steps alone (no VAE decode)
    images: int = 1  # timed images whose steps are pooled in step_times_s
    compile_s: float | None = None  # compile runtime: seconds spent compiling, before (never inside) the timed images
    off_cpu_s: list[float] | None = None  # per step: wall minus the main thread's CPU time (off the CPU)
    run_wait_s: list[float] | None = None  # per step: the main thread's seconds runnable but not running (Linux)
    host_step_times_s: list[float] | None = None  # CUDA: host-clock seconds between the same step boundaries
    gpu_idle_at_end: list[bool] | None = None  # CUDA: per step, the GPU had nothing queued at its end
    idle_probe_s: float | None = None  # CUDA: how long each step's end event was polled (measured per run)
    first_steps_s: list[float] | None = None  # each timed image's first step, kept out of the lists above
    # CUDA with NVML: per step, the lowest SM clock sampled while it ran (MHz, None: no sample inside it) and whether
    # a sample inside it carried a clock-limiting reason (power or thermal cap, ...): throttled steps are marked.
    step_sm_clock_mhz: list[float | None] | None = None
    throttled_steps: list[bool] | None = None
    nonfinite_latents: int = 0  # NaN/Inf values in the timed images' final latents, all summed (judging.tripwire)
    # One entry per timed image, in order: its PIL image, its final latents' NaN/Inf count, its case's name (set by
    # `runner.Loaded.images`). `image` is the first.
    case_images: list = field(default_factory=list, repr=False)
    case_nonfinite: list[int] = field(default_factory=list)
    case_names: list[str] = field(default_factory=list)
    images_wall_s: float | None = None  # wall seconds of the timed images, telemetry start and stop included
    phases_s: dict | None = None  # where the combo's wall time went (`runner.Runner.measure`), seconds

    @property
    def stats(self) -> StepStats:
        return step_stats(self.step_times_s)

    @property
    def spikes(self) -> Spikes:
        return spikes(self.step_times_s, self.off_cpu_s, self.gpu_idle_at_end)

    @property
    def it_s(self) -> float:
        """Denoising steps per second at the median step time: a preempted step or a clock dip moves it only when
        it hits half the steps (step times are right-skewed, so the mean overstates a burst)."""
        ordered = sorted(self.step_times_s)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return 1.0 / median

    @property
    def it_s_mean(self) -> float:
        """Steps per second over the total time of the timed steps."""
        return len(self.step_times_s) / sum(self.step_times_s)


class _StepClock:
    """Marks step boundaries: a forward pre-hook on the transformer opens the loop, each step-end callback closes a
    step. Only events or timestamps are recorded here; nothing waits for the device."""

    def __init__(self, device: torch.device, probe_s: float = IDLE_PROBE_MIN_S):
        self.cuda, self.probe_s = device.type == "cuda", probe_s
        self.marks: list[Any] = []
        self.host_marks: list[float] = []  # perf_counter() at each boundary
        self.cpu_marks: list[float] = []  # the main thread's thread_time() at each boundary
        self.wait_marks: list[float | None] = []  # the main thread's run-queue wait so far (`run_queue_wait_s`)
        self.gpu_idle_at_end: list[bool] = []  # per step (CUDA): its end event completed within probe_s
        # CUDA allocator peaks, read on the host (no device sync): before the loop (text/image encoding) and
        # during the denoising steps alone (transformer forwards, comparable with a bare-transformer measurement).
        self.before_loop_peak_bytes = 0
        self.denoise_peak_bytes = 0
        self.last_latents = None  # the latents after the last step (held, not read: no sync inside the loop)

    def _mark(self) -> None:
        self.cpu_marks.append(time.thread_time())
        self.wait_marks.append(run_queue_wait_s())
        self.host_marks.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
            if len(self.marks) > 1:
                self.gpu_idle_at_end.append(_completes_within(event, self.probe_s))
        else:
            self.marks.append(self.host_marks[-1])

    def loop_start(self, module, args, kwargs=None) -> None:
        if not self.marks and self.cuda:
            self.before_loop_peak_bytes = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if not self.marks:
            self._mark()

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' `callback_on_step_end`: a step ended; returns `callback_kwargs` unchanged."""
        self._mark()
        self.last_latents = callback_kwargs.get("latents")
        if self.cuda:
            self.denoise_peak_bytes = torch.cuda.max_memory_allocated()
        return callback_kwargs

    def legacy_step_end(self, step: int, timestep, latents) -> None:
        """The older `callback(step, timestep, latents)` some pipelines still take instead (PixArt's)."""
        self.step_end(None, step, timestep, {"latents": latents})

    def call_kwargs(self, pipe) -> dict:
        """The pipeline call's keyword arguments that mark each step's end: `callback_on_step_end` (diffusers' current
        API), else the legacy `callback` called every step (`callback_steps=1`). Raises FluxgateError naming the
        pipeline class when its `__call__` takes neither (its steps cannot be timed)."""
        parameters = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in parameters:
            return {"callback_on_step_end": self.step_end}
        if "callback" in parameters:
            return {"callback": self.legacy_step_end, "callback_steps": 1}
        raise FluxgateError(f"{type(pipe).__name__}.__call__ takes neither callback_on_step_end nor callback: "
                            "fluxgate cannot time its denoising steps")

    def step_times_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return _deltas(self.marks)

    def host_step_times_s(self) -> list[float] | None:
        return _deltas(self.host_marks) if self.cuda else None

    def off_cpu_s(self) -> list[float]:
        return [max(0.0, wall - cpu) for wall, cpu in zip(_deltas(self.host_marks), _deltas(self.cpu_marks))]

    def run_wait_s(self) -> list[float] | None:
        if not self.wait_marks or any(mark is None for mark in self.wait_marks):
            return None
        return _deltas(self.wait_marks)


def run_queue_wait_s() -> float | None:
    """Seconds the calling thread has spent runnable but waiting for a CPU (the second field of Linux's
    /proc/thread-self/schedstat, nanoseconds), or None where the kernel does not say. Unlike off-CPU time, sleeping
    or blocking in a wait does not count: only other work holding the cores does."""
    try:
        with open("/proc/thread-self/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _completes_within(event, seconds: float) -> bool:
    """Whether `event` completes within `seconds` of now. A completion seen only after the deadline (this thread was
    preempted while polling, and a busy GPU finished meanwhile) does not count."""
    deadline = time.perf_counter() + seconds
    while not event.query():
        if time.perf_counter() > deadline:
            return False
    return time.perf_counter() <= deadline


def idle_probe_s(device: torch.device, samples: int = 20) -> float:
    """How long to poll a step's end event: 3x the slowest completion of an event recorded on the idle GPU (this
    machine's launch latency), within [IDLE_PROBE_MIN_S, IDLE_PROBE_MAX_S]."""
    slowest = 0.0
    for _ in range(samples):
        torch.cuda.synchronize(device)
        event = torch.cuda.Event()
        started = time.perf_counter()
        event.record()
        while not event.query() and time.perf_counter() - started < IDLE_PROBE_MAX_S:
            pass
        slowest = max(slowest, time.perf_counter() - started)
    return min(max(IDLE_PROBE_MIN_S, 3 * slowest), IDLE_PROBE_MAX_S)


def _deltas(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])]


class _RssSampler:
    """Peak resident set size of this process, sampled in a background thread (Linux /proc)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        import os
        import resource

        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: lifetime peak is the best available
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_RssSampler":
        self.peak_bytes = self.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def _seeded(call_kwargs: dict, seed: int, **overrides) -> dict:
    # A fresh CPU generator per image: the warm-up must not shift the timed image's noise, and CPU noise is the
    # same on every device.
    return {**call_kwargs, **overrides, "generator": torch.Generator("cpu").manual_seed(seed)}


def _timed_call(pipe, call_kwargs: dict, device: torch.device, probe_s: float = IDLE_PROBE_MIN_S
                ) -> tuple[list[float], float, Any, _StepClock]:
    clock = _StepClock(device, probe_s)
    handle = denoiser_of(pipe).register_forward_pre_hook(clock.loop_start)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        image = pipe(**call_kwargs, **clock.call_kwargs(pipe)).images[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        e2e_s = time.perf_counter() - start
    finally:
        handle.remove()
    return clock.step_times_s(), e2e_s, image, clock


# What a record's step_times_s holds (the run's fingerprint carries it, and history compares like with like): each
# timed image's steps after its first, which is kept apart (`_timed_images`). Records made before had no such field.
STEP_TIMING = "first-step-apart"


def _split_first(steps: list) -> tuple[list, list]:
    """An image's per-step values as (its first step's, as a list; the steps' after it). A one-step image has
    nothing to set apart."""
    return (steps[:1], steps[1:]) if len(steps) > 1 else ([], steps)


def _timed_images(pipe, calls: list[tuple[dict, int]], device: torch.device, probe_s: float = IDLE_PROBE_MIN_S):
    """One timed image per (call kwargs, noise seed) of `calls`: their step times, the median seconds per image, the
    images, the allocator peaks, and the per-step host lists (off-CPU seconds; CUDA: host-clock times and
    GPU-idle-at-end flags) with each image's count of non-finite final latents.

    Each image's first step is timed but kept apart (`first_steps_s`): it is a start-up transient, not a sample of
    the steady state. On the H100 it ran 1-10 % slower than the steps after it for eager fp8 and gguf (it starts
    with the GPU's queue empty, so launch-bound stretches that later steps hide behind the host's lead cost it
    time) and up to 4 % faster for bf16 combos held at the 700 W power cap (the GPU starts the image below it).
    The step statistics, it/s and the history judge the steps after it.
    Python's garbage collector is off while they run (as `timeit` does), so no collection pass lands inside a
    timed step of a launch-bound eager pipeline. Only its young generations are collected before: a full pass over
    a loaded pipeline's heap cost 0.33 s (tiny profile, 2-core CPU), paid by every image of an A/B block (its
    worker makes one image a call), a fifth of a block there; the old generation is collected at the combo's
    release (`memory.release`) and by Python's own thresholds between calls."""
    step_times, e2e, images, peaks = [], [], [], {"before_loop": 0, "denoise": 0}
    host: dict[str, list | None] = {"off_cpu_s": [], "run_wait_s": [], "host_step_times_s": [],
                                    "gpu_idle_at_end": [], "first_steps_s": [], "case_nonfinite": [],
                                    "step_windows": []}
    gc.collect(1)
    gc.disable()
    try:
        for call_kwargs, seed in calls:
            steps, seconds, image, clock = _timed_call(pipe, _seeded(call_kwargs, seed), device, probe_s)
            images.append(image)
            first, settled = _split_first(steps)
            host["first_steps_s"] += first
            step_times += settled
            e2e.append(seconds)
            peaks["before_loop"] = max(peaks["before_loop"], clock.before_loop_peak_bytes)
            peaks["denoise"] = max(peaks["denoise"], clock.denoise_peak_bytes)
            host["off_cpu_s"] += _split_first(clock.off_cpu_s())[1]
            waits = clock.run_wait_s()
            host["run_wait_s"] = None if waits is None or host["run_wait_s"] is None else \
                host["run_wait_s"] + _split_first(waits)[1]
            host["host_step_times_s"] += _split_first(clock.host_step_times_s() or [])[1]
            host["gpu_idle_at_end"] += _split_first(clock.gpu_idle_at_end)[1]
            host["step_windows"] += _split_first(list(zip(clock.host_marks, clock.host_marks[1:])))[1]
            # read after the image, outside every timed step
            latents = clock.last_latents
            host["case_nonfinite"].append(0 if latents is None else int((~torch.isfinite(latents)).sum()))
            clock.last_latents = None
    finally:
        gc.enable()
    if device.type != "cuda":
        host.update(host_step_times_s=None, gpu_idle_at_end=None)
    return step_times, sorted(e2e)[len(e2e) // 2], images, peaks, host


def measure_images(pipe, call_kwargs: dict, seed: int, device: torch.device, warmup_steps: int = 1,
        timed_images: int = 1, baseline_used_bytes: int | None = None, telemetry_interval_s: float = 0.1
        ) -> Measurement:
    """One untimed warm-up image of `warmup_steps` steps, then `timed_images` timed images with `call_kwargs`."""
    warm_up_image(pipe, call_kwargs, seed, warmup_steps)
    return measure_timed(pipe, call_kwargs, seed, device, timed_images, baseline_used_bytes, telemetry_interval_s)


def warm_up_image(pipe, call_kwargs: dict, seed: int, warmup_steps: int = 1) -> None:
    """One untimed image of `warmup_steps` steps (none for 0): kernels loaded, caches and allocator warm."""
    if warmup_steps > 0:
        pipe(**_seeded(call_kwargs, seed, num_inference_steps=warmup_steps))


def measure_timed(pipe, call_kwargs: dict, seed: int, device: torch.device, count: int = 1,
                  baseline_used_bytes: int | None = None, telemetry_interval_s: float = 0.1) -> Measurement:
    """`count` timed images with `call_kwargs` and noise `seed` (no warm-up: `warm_up_image` first), peak memory
    counted from their start: the Measurement of `measure_images`."""
    return measure_calls(pipe, [(call_kwargs, seed)] * count, device, baseline_used_bytes, telemetry_interval_s)


def measure_calls(pipe, calls: list[tuple[dict, int]], device: torch.device, baseline_used_bytes: int | None = None,
                  telemetry_interval_s: float = 0.1) -> Measurement:
    """One timed image per (call kwargs, noise seed) in `calls` (no warm-up), steps pooled, peak memory counted from
    their start."""
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        probe_s = idle_probe_s(device)
        # 100 ms by default: NVML calls take the GIL, and a launch-bound step should not wait on the sampler often.
        with telemetry.GpuSampler(device, interval_s=telemetry_interval_s,
                                  baseline_used_bytes=baseline_used_bytes) as gpu:
            step_times, e2e_s, images, peaks, host = _timed_images(pipe, calls, device, probe_s)
        clocks = gpu.step_clocks(host.pop("step_windows"))
        if clocks is not None:
            host.update(step_sm_clock_mhz=clocks.sm_clock_mhz, throttled_steps=clocks.throttled)
        # The loop start resets the allocator's peak, so the whole-image peak is the larger of the two windows.
        peak = max(peaks["before_loop"], torch.cuda.max_memory_allocated(device))
        reserved = torch.cuda.max_memory_reserved(device) / GIB
        return Measurement(step_times, e2e_s, peak / GIB, "cuda_max_allocated", reserved, images[0], gpu.telemetry,
                           denoise_peak_gib=peaks["denoise"] / GIB, images=len(calls), idle_probe_s=probe_s,
                           nonfinite_latents=sum(host["case_nonfinite"]), case_images=images,
                           images_wall_s=time.perf_counter() - started, **host)
    with _RssSampler() as rss:
        step_times, e2e_s, images, _, host = _timed_images(pipe, calls, device)
    host.pop("step_windows")
    return Measurement(step_times, e2e_s, rss.peak_bytes / GIB, "process_rss_peak", None, images[0],
                       images=len(calls), nonfinite_latents=sum(host["case_nonfinite"]), case_images=images,
                       images_wall_s=time.perf_counter() - started, **host)
