"""fluxgate.measuring.telemetry: NVML sampling degrades to `available=False` instead of raising, decodes clock-event reasons
from both NVML naming generations, and summarises samples (throttling, energy, process memory).

No GPU is needed: a fake `pynvml` module stands in for NVML where a test needs one that works.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import pynvml
import pytest
import torch

from fluxgate.measuring import telemetry
from fluxgate.measuring.telemetry import BENIGN_REASONS, GpuSampler, decode_reasons, gpu_fingerprint, reason_names

CUDA = torch.device("cuda:0")
GIB = 1024**3


class FakeNVMLError(Exception):
    pass


def fake_nvml(pid: int, reasons: list[int], temperature_supported: bool = True) -> SimpleNamespace:
    """An NVML with one GPU (UUID GPU-fake) whose readings move with each call: SM clock 1980 then 1755 MHz,
    power 300 W, energy +5000 mJ per read, 2 GiB used by `pid`, 3 GiB used on the device; clock-event reasons cycle
    through `reasons`. Only the older (Throttle) names of the reason constants, as in old nvidia-ml-py releases."""
    state = {"reads": 0, "energy": 1_000_000, "inits": 0, "reasons": 0}

    def clock_reasons(handle):
        state["reasons"] += 1
        return reasons[state["reasons"] % len(reasons)]

    def temperature(handle, sensor):
        if not temperature_supported:
            raise FakeNVMLError("Not Supported")
        return 61

    def clock(handle, kind):
        if kind != 1:
            return 2619
        state["reads"] += 1
        return 1980 if state["reads"] % 2 else 1755

    def energy(handle):
        state["energy"] += 5000
        return state["energy"]

    def handle_by_uuid(uuid):
        if uuid != "GPU-fake":
            raise FakeNVMLError("Not Found")
        return "handle"

    return SimpleNamespace(
        NVMLError=FakeNVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlClocksThrottleReasonGpuIdle=0x1, nvmlClocksThrottleReasonApplicationsClocksSetting=0x2,
        nvmlClocksThrottleReasonSwPowerCap=0x4, nvmlClocksThrottleReasonHwThermalSlowdown=0x40,
        nvmlClocksThrottleReasonAll=0x1FF, nvmlClocksThrottleReasonNone=0,
        nvmlInit=lambda: state.update(inits=state["inits"] + 1), nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=handle_by_uuid,
        nvmlDeviceGetClockInfo=clock, nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetPowerUsage=lambda handle: 300_000,
        nvmlDeviceGetCurrentClocksThrottleReasons=clock_reasons,
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=3 * GIB, total=80 * GIB),
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [SimpleNamespace(pid=pid, usedGpuMemory=2 * GIB)],
        nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetUUID=lambda handle: "GPU-fake", nvmlSystemGetDriverVersion=lambda: "580.65.06",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 13000,
        nvmlDeviceGetPowerManagementLimit=lambda handle: 700_000,
        nvmlDeviceGetEnforcedPowerLimit=lambda handle: 700_000,
        nvmlDeviceGetPowerManagementDefaultLimit=lambda handle: 700_000,
        nvmlDeviceGetDefaultApplicationsClock=lambda handle, kind: 1755 if kind == 1 else 2619,
        nvmlDeviceGetApplicationsClock=lambda handle, kind: 1755 if kind == 1 else 2619,
        nvmlDeviceGetMaxClockInfo=lambda handle, kind: 1980 if kind == 1 else 2619,
        nvmlDeviceGetPersistenceMode=lambda handle: 1, nvmlDeviceGetEccMode=lambda handle: (1, 1),
        nvmlDeviceGetMigMode=lambda handle: (0, 0),
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake pynvml and make torch describe cuda:0 as the GPU with UUID `fake`; returns an installer."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(
        uuid="fake", name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * GIB, multi_processor_count=132))

    def install(**kwargs) -> SimpleNamespace:
        nvml = fake_nvml(**{"pid": os.getpid(), "reasons": [0], **kwargs})
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return install


def sample(seconds: float = 0.06, **kwargs) -> telemetry.Telemetry:
    with GpuSampler(CUDA, interval_s=0.01, **kwargs) as sampler:
        time.sleep(seconds)
    return sampler.telemetry


def test_on_cpu_the_sampler_reports_no_telemetry_and_why():
    with GpuSampler(torch.device("cpu")) as sampler:
        pass

    assert sampler.telemetry.available is False
    assert "cpu" in sampler.telemetry.reason
    json.dumps(sampler.telemetry.to_json())


def test_without_nvml_the_sampler_reports_why_and_the_block_still_runs(monkeypatch):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    ran = False
    with GpuSampler(CUDA) as sampler:
        ran = True

    assert ran and sampler.telemetry.available is False
    assert sampler.telemetry.reason.startswith("NVML unavailable") and "Not Found" in sampler.telemetry.reason


def test_without_nvidia_ml_py_installed_the_sampler_reports_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError

    telemetry_ = sample(0)

    assert telemetry_.available is False and "pynvml" in telemetry_.reason


def test_an_error_inside_the_block_propagates_and_the_sampler_stops(fake_gpu):
    fake_gpu()
    with pytest.raises(KeyError), GpuSampler(CUDA, interval_s=0.01) as sampler:
        raise KeyError("measurement bug")

    assert sampler.telemetry.available is True and sampler._thread is None


def test_known_bitmask_decodes_to_reason_names():
    names = reason_names()

    assert decode_reasons(0x1 | 0x4 | 0x40, names) == {"GpuIdle", "SwPowerCap", "HwThermalSlowdown"}
    assert decode_reasons(0x2, names) == {"ApplicationsClocksSetting"}  # alias UserDefinedClocks, same bit
    assert decode_reasons(0x80 | 0x8, names) == {"HwPowerBrakeSlowdown", "HwSlowdown"}
    assert decode_reasons(0, names) == set()
    assert decode_reasons(1 << 40, names) == {"Unknown(0x10000000000)"}


def test_older_throttle_reason_names_decode_like_the_newer_event_names():
    old_only = SimpleNamespace(**{name: getattr(pynvml, name) for name in dir(pynvml)
                                  if name.startswith("nvmlClocksThrottleReason")})
    new_only = SimpleNamespace(**{name: getattr(pynvml, name) for name in dir(pynvml)
                                  if name.startswith("nvmlClocksEventReason")})

    mask = 0x1 | 0x2 | 0x4 | 0x20
    assert decode_reasons(mask, reason_names(old_only)) == decode_reasons(mask, reason_names(new_only))


def test_idle_and_user_set_clocks_do_not_count_as_throttling(fake_gpu):
    fake_gpu(reasons=[0x1, 0x2, 0x1 | 0x4, 0x40])  # idle, locked clocks, idle + power cap, thermal

    result = sample(0.1)

    assert result.available and result.samples >= 4
    assert result.throttle_reasons >= {"GpuIdle", "ApplicationsClocksSetting", "SwPowerCap", "HwThermalSlowdown"}
    throttled = [bool(decode_reasons(mask, reason_names()) - BENIGN_REASONS) for mask in (0x1, 0x2, 0x5, 0x40)]
    assert throttled == [False, False, True, True]
    assert 0 < result.throttled_fraction < 1


def test_sampled_window_summarises_clocks_power_energy_and_process_memory(fake_gpu):
    fake_gpu()

    result = sample()

    assert result.available and result.nvml_device == "uuid GPU-fake"
    assert result.sm_clock_mhz.min == 1755 and result.sm_clock_mhz.max == 1980
    assert result.mem_clock_mhz.median == 2619 and result.temperature_c.max == 61 and result.power_w.median == 300
    assert result.energy_j == pytest.approx(5.0)  # one counter read at enter, one at exit, +5000 mJ
    assert result.peak_process_mem_gib == pytest.approx(2.0) and result.process_mem_source == "nvml_process"
    assert result.peak_device_used_gib == pytest.approx(3.0)
    assert result.throttled_fraction == 0 and result.throttle_reasons == set()
    json.dumps(result.to_json(), allow_nan=False)


def test_pid_missing_from_nvml_falls_back_to_device_memory_delta_and_says_so(fake_gpu):
    fake_gpu(pid=-1)  # a container: NVML lists the host pid, not ours

    result = sample(baseline_used_bytes=1 * GIB)

    assert result.process_mem_source == "device_used_delta"
    assert result.peak_process_mem_gib == pytest.approx(2.0)  # 3 GiB used - 1 GiB before this process
    assert any("not in NVML's process list" in note for note in result.notes)


def test_a_metric_nvml_does_not_support_is_left_out_with_a_note(fake_gpu):
    fake_gpu(temperature_supported=False)

    result = sample()

    assert result.available and result.temperature_c is None and result.sm_clock_mhz is not None
    assert any(note.startswith("temperature not available") for note in result.notes)


def test_unmatched_gpu_reports_why_without_raising(fake_gpu, monkeypatch):
    fake_gpu()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="other"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-other")

    result = sample(0)

    assert result.available is False and "no NVML device matches" in result.reason


def test_fingerprint_is_empty_on_cpu():
    assert gpu_fingerprint(torch.device("cpu")) == {}


def test_fingerprint_holds_driver_clocks_and_power_limit(fake_gpu):
    fake_gpu()

    info = gpu_fingerprint(CUDA)

    assert info["uuid"] == "GPU-fake" and info["name"] == "NVIDIA H100 80GB HBM3"
    assert info["driver_version"] == "580.65.06" and info["cuda_driver_version"] == "13.0"
    assert info["power_limit_w"] == 700 and info["compute_capability"] == "9.0"
    assert info["sm_clock_max_mhz"] == 1980 and info["sm_clock_default_mhz"] == 1755
    assert info["persistence_mode"] is True and info["ecc_mode"] == {"current": True, "pending": True}
    assert "nvml_errors" not in info and "nvml_error" not in info
    json.dumps(info)


def test_with_a_zero_interval_no_thread_samples_during_the_block_but_energy_and_one_sample_remain(fake_gpu):
    fake_gpu()

    with GpuSampler(CUDA, interval_s=0) as gpu:
        assert gpu._thread is not None and not gpu._thread.is_alive()
        time.sleep(0.05)

    assert gpu.telemetry.available and gpu.telemetry.samples == 1
    assert gpu.telemetry.energy_j == pytest.approx(5.0)


def test_a_cuda_runs_environment_records_the_settings_history_compares_on(monkeypatch, tmp_path):
    from fluxgate.measuring import environment, kernels, memory

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(telemetry, "gpu_fingerprint", lambda device: {"driver_version": "580.65.06"})
    monkeypatch.setenv(kernels.CUPTI_TEARDOWN_ENV, "1")
    monkeypatch.setenv(memory.ALLOC_CONF_ENV, "expandable_segments:True")

    info = environment.fingerprint(torch.device("cuda"), tmp_path)

    assert info["cupti_teardown"] is True and info["cuda_alloc_conf"] == "expandable_segments:True"
    assert info["gpu_class"] == "nvidia-h100-80gb-hbm3" and info["compute_capability"] == "9.0"
    monkeypatch.setenv(kernels.CUPTI_TEARDOWN_ENV, "0")
    assert environment.fingerprint(torch.device("cuda"), tmp_path)["cupti_teardown"] is False
    assert "cupti_teardown" not in environment.fingerprint(torch.device("cpu"), tmp_path)


def test_samples_are_attributed_to_the_steps_they_fall_in_and_a_capped_step_is_marked_throttled():
    from fluxgate.measuring.telemetry import step_clocks

    names = {0x1: "GpuIdle", 0x4: "SwPowerCap"}
    samples = [{"t": 0.05, "sm_clock_mhz": 1980, "reasons": 0x0},
               {"t": 0.15, "sm_clock_mhz": 1755, "reasons": 0x4},  # power cap inside step 2
               {"t": 0.18, "sm_clock_mhz": 1900, "reasons": 0x1},  # idle is benign
               {"t": 0.45, "sm_clock_mhz": None, "reasons": None}]  # NVML gave nothing
    clocks = step_clocks(samples, [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.4, 0.5)], names)
    assert clocks.sm_clock_mhz == [1980, 1755, None, None]
    assert clocks.throttled == [False, True, False, False]
