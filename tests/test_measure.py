"""What a spiking step was waiting for: the step clock's off-CPU times and GPU-idle probes (CUDA events scripted),
the classification built on them, and the summary lines that show it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from fluxgate import measure
from fluxgate.gate import Outcome
from fluxgate.matrix import Combo
from fluxgate.report import spike_line, terminal_summary
from fluxgate.stats import HOST_BOUND, HOST_PAUSE, OTHER, spikes, step_stats


class ScriptedEvent:
    """A CUDA event on a scripted GPU: `idle` says whether the GPU has nothing queued when the next event is recorded
    (it then completes at once); `at_ms` holds the events' GPU times."""

    idle = False
    at_ms: list[float] = []
    recorded: list["ScriptedEvent"] = []

    def __init__(self, enable_timing: bool = False):
        self.index, self.done = None, False

    def record(self):
        self.index, self.done = len(ScriptedEvent.recorded), ScriptedEvent.idle
        ScriptedEvent.recorded.append(self)

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: "ScriptedEvent") -> float:
        return ScriptedEvent.at_ms[end.index] - ScriptedEvent.at_ms[self.index]


@pytest.fixture
def scripted_gpu(monkeypatch):
    ScriptedEvent.idle, ScriptedEvent.at_ms, ScriptedEvent.recorded = False, [], []
    monkeypatch.setattr(torch.cuda, "Event", ScriptedEvent)
    for name in ("max_memory_allocated", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    return ScriptedEvent


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_step_whose_end_finds_the_gpu_idle_is_flagged_and_a_busy_one_is_not(scripted_gpu):
    clock = measure._StepClock(torch.device("cuda"))
    clock.loop_start(None, ())
    scripted_gpu.idle = True
    clock.step_end(None, 0, None, {})  # the GPU had run everything: its end event completes at once
    scripted_gpu.idle = False
    started = time.perf_counter()
    clock.step_end(None, 1, None, {})  # queued work: the probe gives up after IDLE_PROBE_S
    probe_s = time.perf_counter() - started
    scripted_gpu.at_ms = [0.0, 100.0, 180.0]

    assert clock.gpu_idle_at_end == [True, False]
    assert measure.IDLE_PROBE_S <= probe_s < 0.01
    assert clock.step_times_s() == pytest.approx([0.1, 0.08])
    assert len(clock.host_step_times_s()) == 2 and len(clock.off_cpu_s()) == 2


def test_the_main_thread_off_the_cpu_is_measured_per_step():
    clock = measure._StepClock(torch.device("cpu"))
    clock.loop_start(None, ())
    _busy(0.05)
    clock.step_end(None, 0, None, {})
    time.sleep(0.05)
    clock.step_end(None, 1, None, {})

    busy, slept = clock.off_cpu_s()
    assert slept > 0.04 and busy < 0.02, (busy, slept)
    assert clock.gpu_idle_at_end == [] and clock.host_step_times_s() is None


def test_each_spike_is_put_down_to_a_host_pause_an_idle_gpu_or_neither():
    times = [0.28] * 25 + [0.40, 0.36, 0.33]                # +43 %, +29 %, +18 %
    off_cpu = [0.001] * 25 + [0.10, 0.002, 0.002]           # step 25: 99 ms off the CPU of a 120 ms excess
    idle = [False] * 25 + [False, True, False]
    found = spikes(times, off_cpu, idle)

    assert found.steps == [25, 26, 27] and found.causes == [HOST_PAUSE, HOST_BOUND, OTHER]
    assert found.max_excess == pytest.approx(0.40 / 0.28 - 1) and found.idle_total == 1
    assert found.describe() == ("3 of 28 steps ≥10% over the median (slowest +43%): 1 host pause (main thread off "
                                "the CPU), 1 host-bound (GPU idle at the step's end), 1 other (thread on the CPU, GPU "
                                "busy at the step's end); GPU idle at 1 of 28 step ends")


def test_on_cpu_or_without_per_step_lists_spikes_are_counted_and_steady_steps_have_no_line():
    on_cpu = spikes([0.02, 0.02, 0.02, 0.05], [0.0, 0.0, 0.0, 0.0])
    assert on_cpu.idle_total is None and on_cpu.causes == [OTHER]
    assert on_cpu.describe() == "1 of 4 steps ≥10% over the median (slowest +150%): 1 other (thread on the CPU)"
    assert spikes([0.02, 0.05], [0.0], [True]).causes == [OTHER]  # lists that do not line up are not used
    assert spikes([0.02, 0.021, 0.0205]).describe() is None


def _metrics(times, off_cpu, idle) -> dict:
    return {"mem_kind": "cuda_max_allocated", "it_s": 1 / sorted(times)[len(times) // 2],
            "step_stats": step_stats(times).to_json(), "spikes": spikes(times, off_cpu, idle).to_json()}


def test_a_spike_line_is_shown_for_cuda_combos_with_spikes_only():
    noisy = [0.28] * 26 + [0.40, 0.33]
    assert "host-bound" in spike_line(_metrics(noisy, [0.0] * 28, [False] * 26 + [True, True]))
    assert spike_line(_metrics([0.28, 0.281, 0.279, 0.2805] * 7, [0.0] * 28, [False] * 28)) is None
    assert spike_line(_metrics(noisy, [0.0] * 28, None)) is None  # CPU: the CV column says enough
    assert spike_line({"step_stats": step_stats(noisy).to_json()}) is None  # a record from before spikes existed
    assert spike_line({"spikes": {"steps": [1], "unknown_field": 1}}) is None  # another version's record


def test_the_run_summary_lists_host_bound_combos_and_explains_their_spikes(tmp_path):
    outcomes = [Outcome(Combo.parse("flux1-dev[nvfp4]"),
                        metrics=_metrics([0.46] * 26 + [0.52, 0.55], [0.001] * 28, [True] * 28)),
                Outcome(Combo.parse("flux1-dev[bf16]"), metrics=_metrics([0.18, 0.181] * 14, [0.001] * 28, [False] * 28))]
    lines = []
    reporter = SimpleNamespace(write_line=lines.append, section=lambda title: lines.append(f"== {title}"))
    history = SimpleNamespace(environment={"device_name": "H100"}, records=[], path=tmp_path / "run.json")
    gate = SimpleNamespace(runner=SimpleNamespace(profile="synthetic"), history=history, baselines_root=tmp_path,
                           gpu_class="h100", write=False)

    terminal_summary(reporter, outcomes, gate, started=0.0)

    assert any(line.startswith("host-bound steps") and line.endswith(": flux1-dev[nvfp4] 28/28") for line in lines)
    assert ("step spikes flux1-dev[nvfp4]: 2 of 28 steps ≥10% over the median (slowest +20%): 2 host-bound (GPU idle "
            "at the step's end); GPU idle at 28 of 28 step ends") in lines
    assert not any("flux1-dev[bf16]" in line and ("spikes" in line or "host-bound" in line) for line in lines)
