"""What a spiking step was waiting for: the step clock's off-CPU times and GPU-idle probes (CUDA events scripted),
the classification built on them, and the summary lines that show it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from fluxgate.measuring import measure
from fluxgate.stats import HOST_BOUND, HOST_PAUSE, OTHER, SERIALIZED, spikes, step_stats
from fluxgate.showing.report import RunContext, history_lines, spike_line, terminal_summary
from fluxgate.storing.record import PASSED, Metrics, Record


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


class ScriptedClocks:
    """`time` for measure: perf_counter and thread_time advance only when told (wall and CPU seconds)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu

    def run(self, wall_s: float, cpu_s: float) -> None:
        self.wall += wall_s
        self.cpu += cpu_s


def test_a_step_whose_end_finds_the_gpu_idle_is_flagged_and_a_busy_one_is_not(scripted_gpu):
    clock = measure._StepClock(torch.device("cuda"), probe_s=20e-6)
    clock.loop_start(None, ())
    scripted_gpu.idle = True
    clock.step_end(None, 0, None, {})  # the GPU had run everything: its end event completes at once
    scripted_gpu.idle = False
    started = time.perf_counter()
    clock.step_end(None, 1, None, {})  # queued work: the probe gives up after probe_s
    probe_s = time.perf_counter() - started
    scripted_gpu.at_ms = [0.0, 100.0, 180.0]

    assert clock.gpu_idle_at_end == [True, False]
    assert 20e-6 <= probe_s < 0.05
    assert clock.step_times_s() == pytest.approx([0.1, 0.08])
    assert len(clock.host_step_times_s()) == 2 and len(clock.off_cpu_s()) == 2


def test_a_completion_seen_only_after_the_deadline_does_not_count_as_idle(monkeypatch):
    clocks = ScriptedClocks()
    monkeypatch.setattr(measure, "time", clocks)

    class LateEvent:  # busy at first; done only once the poller is back after being preempted past the deadline
        polls = 0

        def query(self):
            self.polls += 1
            if self.polls == 1:
                clocks.run(wall_s=0.01, cpu_s=0.0)
                return False
            return True

    assert measure._completes_within(LateEvent(), 20e-6) is False
    assert measure._completes_within(SimpleNamespace(query=lambda: True), 20e-6) is True


def test_the_idle_probe_is_three_times_the_slowest_idle_completion_within_bounds(scripted_gpu, monkeypatch):
    with monkeypatch.context() as scripted:  # a scripted clock: a preempted test process is no slow GPU
        scripted.setattr(measure, "time", ScriptedClocks())
        scripted_gpu.idle = True  # scripted events complete at once: the probe is the lower bound
        assert measure.idle_probe_s(torch.device("cuda")) == measure.IDLE_PROBE_MIN_S
    scripted_gpu.idle = False  # never completes: capped (on the real clock, which runs out)
    assert measure.idle_probe_s(torch.device("cuda"), samples=2) == measure.IDLE_PROBE_MAX_S


def test_the_main_thread_off_the_cpu_is_measured_per_step(monkeypatch):
    clocks = ScriptedClocks()
    monkeypatch.setattr(measure, "time", clocks)
    clock = measure._StepClock(torch.device("cpu"))
    clock.loop_start(None, ())
    clocks.run(wall_s=0.05, cpu_s=0.05)  # a busy step
    clock.step_end(None, 0, None, {})
    clocks.run(wall_s=0.08, cpu_s=0.01)  # 70 ms off the CPU
    clock.step_end(None, 1, None, {})

    assert clock.off_cpu_s() == pytest.approx([0.0, 0.07])
    assert clock.step_times_s() == pytest.approx([0.05, 0.08])
    assert clock.gpu_idle_at_end == [] and clock.host_step_times_s() is None


def test_off_cpu_time_is_real_thread_time_a_sleep_shows_and_is_never_negative():
    clock = measure._StepClock(torch.device("cpu"))
    clock.loop_start(None, ())
    time.sleep(0.2)
    clock.step_end(None, 0, None, {})
    (slept,) = clock.off_cpu_s()
    assert 0.15 < slept <= clock.step_times_s()[0]


def test_each_spike_is_put_down_to_a_host_pause_an_idle_gpu_or_neither():
    times = [0.28] * 25 + [0.40, 0.36, 0.33]                # +43 %, +29 %, +18 %
    off_cpu = [0.001] * 25 + [0.10, 0.002, 0.002]           # step 25: 99 ms off the CPU of a 120 ms excess
    idle = [False] * 25 + [False, True, False]
    found = spikes(times, off_cpu, idle)

    assert found.steps == [25, 26, 27] and found.causes == [HOST_PAUSE, HOST_BOUND, OTHER]
    assert found.describe().startswith("3 of 28 steps")
    assert found.max_excess == pytest.approx(0.40 / 0.28 - 1) and found.idle_total == 1
    assert found.describe() == ("3 of 28 steps ≥10% over the median (slowest +43%): 1 host pause (main thread off "
                                "the CPU), 1 host-bound (GPU idle at the step's end), 1 other (thread on the CPU, GPU "
                                "busy at the step's end); GPU idle at 1 of 28 step ends")


def test_when_the_gpu_is_idle_at_most_step_ends_a_spike_is_not_put_down_to_the_host():
    times = [0.46] * 26 + [0.52, 0.55]
    found = spikes(times, [0.001] * 28, [True] * 28)  # e.g. a blocking copy inside every step
    assert found.causes == [SERIALIZED, SERIALIZED] and found.idle_total == 28
    assert "2 not separable (GPU idle at most step ends: host and GPU take turns)" in found.describe()
    # a host pause is still a host pause
    assert spikes(times, [0.001] * 27 + [0.08], [True] * 28).causes == [SERIALIZED, HOST_PAUSE]


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
    assert "host-bound" in spike_line(Metrics.from_json(_metrics(noisy, [0.0] * 28, [False] * 26 + [True, True])))
    assert spike_line(Metrics.from_json(_metrics([0.28, 0.281, 0.279, 0.2805] * 7, [0.0] * 28, [False] * 28))) is None
    assert spike_line(Metrics.from_json(_metrics(noisy, [0.0] * 28, None))) is None  # CPU: the CV column says enough
    assert spike_line(Metrics.from_json({"step_stats": step_stats(noisy).to_json()})) is None  # a record from before spikes existed
    assert spike_line(Metrics.from_json({"spikes": {"steps": [1], "unknown_field": 1}})) is None  # another version's record


def test_the_run_summary_lists_combos_whose_gpu_waits_at_most_step_ends_and_explains_their_spikes(tmp_path):
    def record(combo_id, metrics):
        return Record(combo_id, outcome=PASSED, profile="synthetic", metrics=Metrics.from_json(metrics),
                      environment={"device_name": "H100"})

    records = [record("flux1-dev[nvfp4]", _metrics([0.46] * 26 + [0.52, 0.55], [0.001] * 28, [True] * 28)),
               record("flux1-dev[fp8-scaled]",  # one idle step end: not a waiting GPU
                      _metrics([0.28] * 27 + [0.40], [0.001] * 28, [False] * 27 + [True])),
               record("flux1-dev[bf16]", _metrics([0.18, 0.181] * 14, [0.001] * 28, [False] * 28))]
    lines = []
    reporter = SimpleNamespace(write_line=lines.append, section=lambda title: lines.append(f"== {title}"))

    terminal_summary(reporter, records, RunContext(started=0.0, run_location=str(tmp_path / "run.json"),
                                                   baselines=tmp_path / "h100"))

    assert any(line.startswith("GPU idle at most step ends") and line.endswith(": flux1-dev[nvfp4] 28/28")
               for line in lines), lines
    assert ("step spikes flux1-dev[nvfp4]: 2 of 28 steps ≥10% over the median (slowest +20%): 2 not separable (GPU "
            "idle at most step ends: host and GPU take turns); GPU idle at 28 of 28 step ends") in lines
    assert ("step spikes flux1-dev[fp8-scaled]: 1 of 28 steps ≥10% over the median (slowest +43%): 1 host-bound (GPU "
            "idle at the step's end); GPU idle at 1 of 28 step ends") in lines
    assert not any("flux1-dev[bf16]" in line for line in lines if not line.startswith("flux1-dev[bf16] "))


def test_odd_spike_records_give_no_line_rather_than_a_broken_summary():
    odd = {"threshold": None, "steps": [1], "causes": None, "max_excess": 0.5, "idle_total": 1, "n": 2}
    assert spike_line(Metrics.from_json({"spikes": odd})) is None
    assert spike_line(Metrics.from_json({"spikes": {**odd, "n": "2"}})) is None


class ScriptedPipe:
    """A pipeline whose transformer forward takes `step_s[i]` scripted seconds (on the CPU) in step i."""

    def __init__(self, clocks: ScriptedClocks, step_s: list[float]):
        self.clocks, self.step_s = clocks, step_s
        self.transformer = torch.nn.Identity()

    def __call__(self, num_inference_steps: int | None = None, callback_on_step_end=None, **kwargs):
        for index, seconds in enumerate(self.step_s[:num_inference_steps]):
            self.transformer(torch.zeros(1))
            self.clocks.run(wall_s=seconds, cpu_s=seconds)
            if callback_on_step_end is not None:
                callback_on_step_end(self, index, None, {})
        return SimpleNamespace(images=["image"])


@pytest.mark.parametrize(("step_s", "first", "settled"), [
    ([0.09, 0.05, 0.06], [0.09, 0.09], [0.05, 0.06, 0.05, 0.06]),
    ([0.07], [], [0.07, 0.07]),  # a one-step image has nothing to set apart
])
def test_each_timed_image_s_first_step_is_kept_apart_from_the_steps_the_stats_judge(monkeypatch, step_s, first,
                                                                                    settled):
    clocks = ScriptedClocks()
    monkeypatch.setattr(measure, "time", clocks)
    result = measure.measure_images(ScriptedPipe(clocks, step_s), {}, seed=0, device=torch.device("cpu"), warmup_steps=1,
                         timed_images=2)
    assert result.first_steps_s == pytest.approx(first)
    assert result.step_times_s == pytest.approx(settled)
    assert len(result.off_cpu_s) == len(settled) and result.stats.n == len(settled)


def test_the_summary_names_combos_whose_step_makes_the_host_wait_and_how_often():
    from fluxgate.showing.report import spike_lines

    entries = [("flux1-dev[nvfp4]", {"kernel_path": {"host_syncs_per_step": 494}}),
               ("flux1-dev[fp8-scaled]", {"kernel_path": {"host_syncs_per_step": 1}}),  # one per step: not listed
               ("z-image-turbo[bf16]", {"kernel_path": {"host_syncs_per_step": None}}), ("odd", {"kernel_path": "?"})]
    (line,) = spike_lines([Record(combo_id, metrics=Metrics.from_json(metrics)) for combo_id, metrics in entries])
    assert line.startswith("host-synchronous") and line.endswith(": flux1-dev[nvfp4] 494")
    assert "larger change" in line


def test_the_history_lines_tally_every_verdict_so_an_all_clear_run_says_so():
    rule = "a confirmed regression fails the run"
    assert history_lines([], rule) == []
    assert history_lines([("no change", "x[y]: no change - ...")] * 16, rule) == [
        "against history (a confirmed regression fails the run): 16 no change"]
    verdicts = [("no change", "n[1]: no change"), ("regression", "a[x]: regression - ..."), ("no change", "n[2]: -"),
                ("not comparable", "b[y]: not comparable (...)")]
    assert history_lines(verdicts, "advisory: --history-gate off", scope="; per worker") == [
        "against history (advisory: --history-gate off; per worker): 2 no change, 1 regression, 1 not comparable",
        "  a[x]: regression - ...", "  b[y]: not comparable (...)"]


def test_the_summary_names_combos_whose_timed_steps_ran_clock_limited_with_the_reasons():
    from fluxgate.showing.report import spike_lines

    capped = Metrics(throttled_steps=[True, False, True], telemetry={"throttle_reasons": ["SwPowerCap"]})
    (line,) = spike_lines([Record("flux2-dev[bf16]", metrics=capped),
                           Record("flux2-dev[nvfp4]", metrics=Metrics(throttled_steps=[False] * 3)),
                           Record("flux1-dev[bf16]", metrics=Metrics())])  # CPU: nothing sampled
    assert line.startswith("clock-limited timed steps") and line.endswith(": flux2-dev[bf16] 2/3 (SwPowerCap)")
