"""The step clock's host-bound flags (with scripted CUDA events) and the spike summary built on them."""

from __future__ import annotations

import pytest
import torch

from fluxgate import measure
from fluxgate.report import spike_line
from fluxgate.stats import spikes, step_stats


class ScriptedEvent:
    """A CUDA event on a scripted GPU timeline: `done` holds the events the GPU has finished, `at_ms` their times."""

    done: set[int] = set()
    at_ms: list[float] = []
    recorded: list["ScriptedEvent"] = []

    def __init__(self, enable_timing: bool = False):
        self.index = None

    def record(self):
        self.index = len(ScriptedEvent.recorded)
        ScriptedEvent.recorded.append(self)

    def query(self) -> bool:
        return self.index in ScriptedEvent.done

    def elapsed_time(self, end: "ScriptedEvent") -> float:
        return ScriptedEvent.at_ms[end.index] - ScriptedEvent.at_ms[self.index]


@pytest.fixture
def scripted_gpu(monkeypatch):
    ScriptedEvent.done, ScriptedEvent.at_ms, ScriptedEvent.recorded = set(), [], []
    monkeypatch.setattr(torch.cuda, "Event", ScriptedEvent)
    for name in ("max_memory_allocated", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    return ScriptedEvent


def test_a_step_is_host_bound_when_the_gpu_had_finished_its_start_before_the_host_finished_enqueuing_it(scripted_gpu):
    clock = measure._StepClock(torch.device("cuda"))
    clock.loop_start(None, ())                   # boundary 0
    scripted_gpu.done = {0}                      # the GPU reached it while the host was still enqueuing step 1
    clock.step_end(None, 0, None, {})            # boundary 1: step 1 host-bound
    clock.step_end(None, 1, None, {})            # boundary 2: boundary 1 still pending -> the GPU was behind
    scripted_gpu.done = {0, 1, 2}
    clock.step_end(None, 2, None, {})            # boundary 3: step 3 host-bound again
    scripted_gpu.at_ms = [0.0, 100.0, 180.0, 300.0]

    assert clock.queue_drained == [True, False, True]
    assert clock.step_times_s() == pytest.approx([0.1, 0.08, 0.12])
    host = clock.host_step_times_s()
    assert len(host) == 3 and all(t >= 0 for t in host)


def test_on_cpu_there_are_no_host_bound_flags():
    clock = measure._StepClock(torch.device("cpu"))
    clock.loop_start(None, ())
    clock.step_end(None, 0, None, {})
    assert clock.queue_drained == [] and clock.host_step_times_s() is None
    assert len(clock.step_times_s()) == 1


def test_spikes_name_the_slow_steps_and_whether_the_host_made_them_slow():
    times = [0.28] * 10 + [0.40, 0.33]  # +43 % and +18 %
    host_bound = spikes(times, [False] * 10 + [True, True])
    assert host_bound.steps == [10, 11] and host_bound.host_bound == [10, 11]
    assert host_bound.max_excess == pytest.approx(0.40 / 0.28 - 1)
    assert "host-bound: the GPU had run dry" in host_bound.describe()
    assert host_bound.describe().startswith("2 of 12 steps ≥10% over the median (slowest +43%)")

    gpu_side = spikes(times, [True] * 3 + [False] * 9)
    assert gpu_side.host_bound == [] and gpu_side.host_bound_total == 3
    assert "GPU-side" in gpu_side.describe() and "(3 of 12 steps host-bound in all)" in gpu_side.describe()

    mixed = spikes(times, [False] * 10 + [True, False])
    assert "1 of them host-bound, the rest GPU-side" in mixed.describe()


def test_without_flags_spikes_are_counted_but_not_explained_and_steady_steps_have_no_line():
    unexplained = spikes([0.02, 0.02, 0.02, 0.05])
    assert unexplained.host_bound is None and unexplained.describe() == "1 of 4 steps ≥10% over the median (slowest +150%)"
    assert spikes([0.02, 0.021, 0.0205]).describe() is None
    # flags that do not line up with the steps (a different count) are not used
    assert spikes([0.02, 0.05], [True]).host_bound is None


def test_the_summary_shows_aspike_line_only_for_a_cuda_combo_with_spikes():
    noisy = [0.28] * 10 + [0.40, 0.33]
    steady = [0.28, 0.281, 0.279, 0.2805] * 7  # CV 0.3 %

    def metrics(times, drained):
        return {"step_stats": step_stats(times).to_json(), "spikes": spikes(times, drained).to_json()}

    assert "host-bound" in spike_line(metrics(noisy, [False] * 10 + [True, True]))
    assert spike_line(metrics(steady, [False] * 28)) is None
    assert spike_line({"step_stats": step_stats(noisy).to_json()}) is None  # a record from before spikes existed
    assert spike_line(metrics(noisy, None)) is None  # CPU: no flags, the CV column says enough


def test_the_run_summary_lists_host_bound_combos_and_explains_their_spikes(tmp_path):
    from types import SimpleNamespace

    from fluxgate.gate import Outcome
    from fluxgate.matrix import Combo
    from fluxgate.report import terminal_summary

    def outcome(combo_id, times, drained):
        return Outcome(Combo.parse(combo_id), metrics={"mem_kind": "cuda_max_allocated", "it_s": 1 / min(times),
                                                       "step_stats": step_stats(times).to_json(),
                                                       "spikes": spikes(times, drained).to_json()})

    outcomes = [outcome("flux1-dev[nvfp4]", [0.46] * 26 + [0.52, 0.55], [True] * 28),
                outcome("flux1-dev[bf16]", [0.18, 0.181] * 14, [False] * 28)]
    lines = []
    reporter = SimpleNamespace(write_line=lines.append, section=lambda title: lines.append(f"== {title}"))
    history = SimpleNamespace(environment={"device_name": "H100"}, records=[], path=tmp_path / "run.json")
    gate = SimpleNamespace(runner=SimpleNamespace(profile="synthetic"), history=history, baselines_root=tmp_path,
                           gpu_class="h100", write=False)

    terminal_summary(reporter, outcomes, gate, started=0.0)

    assert any(line.startswith("host-bound steps") and line.endswith(": flux1-dev[nvfp4] 28/28") for line in lines)
    assert "step spikes flux1-dev[nvfp4]: 2 of 28 steps ≥10% over the median (slowest +20%); host-bound: the GPU " \
           "had run dry waiting for the host (28 of 28 steps host-bound in all)" in lines
    assert not any("flux1-dev[bf16]" in line and ("spikes" in line or "host-bound" in line) for line in lines)
