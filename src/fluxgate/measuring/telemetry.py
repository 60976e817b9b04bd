"""GPU telemetry through NVML (nvidia-ml-py, imported as `pynvml`): what the GPU did while steps were timed, and a
fingerprint of its configuration (clocks, power limit, driver) for the environment record.

Nothing here raises into a measurement: on CPU, without nvidia-ml-py, or when NVML fails, the sampler yields a
`Telemetry` with `available=False` and the reason, and the fingerprint holds what torch knows plus the NVML error.

NVML reports the whole GPU: power, energy, clocks and temperature include any other process on it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GIB = 1024**3
# NVML names the clock-limiting reasons twice: nvmlClocksThrottleReason* (older) and nvmlClocksEventReason*
# (driver 535+, same bit values). The same bit may carry several names (0x2 is ApplicationsClocksSetting and
# UserDefinedClocks): the alphabetically first name is reported, so output is the same on every pynvml version.
_REASON_PREFIXES = ("nvmlClocksEventReason", "nvmlClocksThrottleReason")
# Reasons that do not slow the work being timed: GpuIdle is set when no kernel runs (host gaps between kernels),
# ApplicationsClocksSetting / UserDefinedClocks when clocks are held at values the user chose (`nvidia-smi -ac` or
# `-lgc`, which a benchmark rig sets on purpose). Every other reason (power cap, thermal or hardware slowdown, power
# brake, sync boost, display clocks, board limit) means the GPU ran slower than its clocks allow.
BENIGN_REASONS = frozenset({"GpuIdle", "ApplicationsClocksSetting", "UserDefinedClocks"})


def reason_names(nvml: Any = None) -> dict[int, str]:
    """Bit value -> reason name (`SwPowerCap`, ...) from the NVML constants of both naming generations."""
    if nvml is None:
        import pynvml as nvml
    names: dict[int, str] = {}
    for attribute in sorted(dir(nvml)):
        prefix = next((p for p in _REASON_PREFIXES if attribute.startswith(p)), None)
        value = getattr(nvml, attribute)
        if prefix is None or not isinstance(value, int) or value <= 0 or value & (value - 1):
            continue  # not a reason, or a combination such as `All` / `None`
        name = attribute.removeprefix(prefix)
        names[value] = min(names.get(value, name), name)
    return names


def decode_reasons(mask: int, names: dict[int, str]) -> set[str]:
    """The names of the bits set in a clock-event-reasons bitmask; unnamed bits as `Unknown(0x...)`."""
    reasons, bit = set(), 1
    while bit <= mask:
        if mask & bit:
            reasons.add(names.get(bit, f"Unknown({bit:#x})"))
        bit <<= 1
    return reasons


@dataclass(frozen=True)
class Range:
    """min / median / max of one sampled quantity."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Range | None:
        return cls(min(values), statistics.median(values), max(values)) if values else None


@dataclass
class Telemetry:
    """What the GPU did during a sampled window. Clocks MHz, temperature C, power W, energy J, memory GiB."""

    available: bool
    reason: str | None = None  # why there is no telemetry
    nvml_device: str | None = None  # how the NVML device was matched to the torch device
    samples: int = 0
    interval_s: float | None = None
    sm_clock_mhz: Range | None = None
    mem_clock_mhz: Range | None = None
    temperature_c: Range | None = None
    power_w: Range | None = None  # NVML's power reading (averaged over ~1 s on Ampere and newer)
    throttle_reasons: set[str] = field(default_factory=set)  # every reason seen, benign ones included
    throttled_fraction: float | None = None  # share of samples with a reason outside BENIGN_REASONS
    energy_j: float | None = None  # whole-GPU energy counter, exit minus enter
    peak_process_mem_gib: float | None = None
    process_mem_source: str | None = None  # "nvml_process" or "device_used_delta"
    peak_device_used_gib: float | None = None  # whole-device used memory, every process and context included
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["throttle_reasons"] = sorted(self.throttle_reasons)
        return data


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    """pynvml, initialised for the block (NVML counts nested inits)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _visible_entry(index: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry torch's device `index` refers to, or None when the variable is unset."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    return entries[index] if index < len(entries) else None


def nvml_handle(nvml: Any, device: torch.device) -> tuple[Any, str]:
    """The NVML handle of torch's CUDA `device` and how it was matched: by UUID, else PCI bus id, else the
    CUDA_VISIBLE_DEVICES entry, else the index (NVML numbers every GPU, torch only the visible ones)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or "")
    candidates: list[tuple[str, Callable[[], Any]]] = []
    if uuid:
        full = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        candidates += [(f"uuid {u}", lambda u=u: nvml.nvmlDeviceGetHandleByUUID(u)) for u in full]
    if all(hasattr(props, name) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        candidates.append((f"pci {bus_id}", lambda: nvml.nvmlDeviceGetHandleByPciBusId(bus_id)))
    entry = _visible_entry(index)
    if entry is not None and entry.startswith(("GPU-", "MIG-")):
        candidates.append((f"CUDA_VISIBLE_DEVICES uuid {entry}", lambda: nvml.nvmlDeviceGetHandleByUUID(entry)))
    elif entry is not None and entry.isdigit():
        candidates.append((f"CUDA_VISIBLE_DEVICES index {entry} (assumes CUDA_DEVICE_ORDER=PCI_BUS_ID)",
                           lambda: nvml.nvmlDeviceGetHandleByIndex(int(entry))))
    elif entry is None:
        candidates.append((f"index {index} (no UUID or PCI match)", lambda: nvml.nvmlDeviceGetHandleByIndex(index)))
    errors = []
    for how, get in candidates:
        try:
            return get(), how
        except nvml.NVMLError as error:
            errors.append(f"{how}: {error}")
    raise LookupError(f"no NVML device matches torch {device} ({'; '.join(errors) or 'nothing to match by'})")


def _clock_reasons(nvml: Any, handle: Any) -> int:
    getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(getter(handle))


def _process_used_bytes(nvml: Any, handle: Any, pid: int) -> int | None:
    """This process's GPU memory as NVML accounts it, or None when NVML does not list this pid (a container's PID
    namespace hides the host pid NVML reports) or does not know the amount."""
    for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == pid and process.usedGpuMemory is not None:
            return int(process.usedGpuMemory)
    return None


class GpuSampler:
    """Samples NVML every `interval_s` in a background thread while the block runs; `.telemetry` after exit.

    `baseline_used_bytes`: device memory used before this process allocated anything (see `device_memory_used_bytes`);
    only used when NVML cannot attribute memory to this pid, for the fallback `device used - baseline`. Without it the
    fallback baseline is the used memory at enter, so memory held before the block (weights) is not in the figure.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05, baseline_used_bytes: int | None = None):
        self.device, self.interval_s, self.baseline_used_bytes = device, interval_s, baseline_used_bytes
        self.telemetry = Telemetry(available=False, reason="the sampler has not run")
        self._context: contextlib.AbstractContextManager | None = None
        self._nvml: Any = None  # the pynvml module, initialised
        self._handle: Any = None
        self._how: str | None = None
        self._enter_used: int | None = None
        self._samples: list[dict[str, Any]] = []
        self._unsupported: dict[str, str] = {}  # metric -> NVML error, after which it is not queried again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_mj: int | None = None

    def _probe(self, metric: str, read: Callable[[], Any]) -> Any:
        if metric in self._unsupported:
            return None
        try:
            return read()
        except self._nvml.NVMLError as error:
            self._unsupported[metric] = str(error)
            return None

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        memory = self._probe("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        self._samples.append({
            "t": time.perf_counter(),  # the host clock the step boundaries are marked with (measure._StepClock)
            "sm_clock_mhz": self._probe("sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": self._probe("mem_clock",
                                         lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
            "temperature_c": self._probe("temperature",
                                         lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "power_w": self._probe("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            "reasons": self._probe("clock_reasons", lambda: _clock_reasons(nvml, handle)),
            "device_used": None if memory is None else int(memory.used),
            "process_used": self._probe("processes", lambda: _process_used_bytes(nvml, handle, os.getpid())),
        })

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sample()
                self._stop.wait(self.interval_s)
        except Exception as error:  # a sampler bug must not take the measurement down: it ends the sampling
            self._unsupported["sampler"] = f"{type(error).__name__}: {error}"

    def _energy(self) -> int | None:
        return self._probe("energy", lambda: int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)))

    def __enter__(self) -> GpuSampler:
        if self.device.type != "cuda":
            self.telemetry = Telemetry(available=False, reason=f"device {self.device}: no NVML telemetry off CUDA")
            return self
        try:
            context = _nvml()
            nvml = context.__enter__()
        except Exception as error:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.telemetry = Telemetry(available=False, reason=f"NVML unavailable: {type(error).__name__}: {error}")
            return self
        self._context, self._nvml = context, nvml
        try:
            self._handle, self._how = nvml_handle(nvml, self.device)
            self._energy_mj = self._energy()
            if self.baseline_used_bytes is None:
                memory = self._probe("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(self._handle))
                self._enter_used = None if memory is None else int(memory.used)
            self._thread = threading.Thread(target=self._run, name="fluxgate-gpu-sampler", daemon=True)
            if self.interval_s > 0:  # else: one sample at exit and the energy counter, no thread during the steps
                self._thread.start()
        except Exception as error:
            self._close()
            self.telemetry = Telemetry(available=False, reason=f"NVML sampling failed: {type(error).__name__}: {error}")
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        try:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
            self._sample()
            end_mj = self._energy()
            self.telemetry = self._summary(end_mj)
        except Exception as error:
            self.telemetry = Telemetry(available=False, reason=f"NVML sampling failed: {type(error).__name__}: {error}")
        finally:
            self._close()

    def step_clocks(self, windows: list[tuple[float, float]]) -> StepClocks | None:
        """The sampled clocks of each timed step (see `step_clocks`); None without samples (CPU, no NVML)."""
        if not self._samples or self._nvml is None:
            return None
        return step_clocks(self._samples, windows, reason_names(self._nvml))

    def _close(self) -> None:
        if self._context is not None:
            with contextlib.suppress(Exception):
                self._context.__exit__(None, None, None)
        self._context, self._thread = None, None

    def _summary(self, end_mj: int | None) -> Telemetry:
        samples = self._samples

        def values(key: str) -> list[float]:
            return [s[key] for s in samples if s[key] is not None]

        names = reason_names(self._nvml)
        masks = values("reasons")
        seen = [decode_reasons(mask, names) for mask in masks]
        process = values("process_used")
        device_used = values("device_used")
        notes = [f"{metric} not available: {error}" for metric, error in self._unsupported.items()]
        peak_process, source = None, None
        if process:
            peak_process, source = max(process) / GIB, "nvml_process"
        elif device_used:
            baseline = self.baseline_used_bytes if self.baseline_used_bytes is not None else self._enter_used
            if baseline is not None:
                peak_process, source = max(0, max(device_used) - baseline) / GIB, "device_used_delta"
                minus = ("the baseline read before this process allocated" if self.baseline_used_bytes is not None
                         else "its value when sampling started (memory held before, such as weights, is left out)")
                notes.append(f"pid {os.getpid()} is not in NVML's process list (PID namespace of a container?): "
                             f"process memory is the device's used memory minus {minus}")
        energy = None if end_mj is None or self._energy_mj is None else (end_mj - self._energy_mj) / 1000.0
        return Telemetry(
            available=True, nvml_device=self._how, samples=len(samples), interval_s=self.interval_s,
            sm_clock_mhz=Range.of(values("sm_clock_mhz")), mem_clock_mhz=Range.of(values("mem_clock_mhz")),
            temperature_c=Range.of(values("temperature_c")), power_w=Range.of(values("power_w")),
            throttle_reasons=set().union(*seen),
            throttled_fraction=(sum(bool(s - BENIGN_REASONS) for s in seen) / len(seen)) if seen else None,
            energy_j=energy, peak_process_mem_gib=peak_process, process_mem_source=source,
            peak_device_used_gib=max(device_used) / GIB if device_used else None, notes=notes,
        )


@dataclass
class StepClocks:
    """NVML samples attributed to timed steps: per step, the lowest SM clock sampled while it ran (MHz; None when no
    sample fell inside it) and whether a sample inside it carried a clock-limiting reason outside BENIGN_REASONS."""

    sm_clock_mhz: list[float | None]
    throttled: list[bool]


def step_clocks(samples: list[dict[str, Any]], windows: list[tuple[float, float]],
                names: dict[int, str]) -> StepClocks:
    """Each step's clocks from the sampler's timestamped samples. `windows`: per step, its (start, end) on the host
    clock (time.perf_counter seconds, as the step boundaries were marked). The host marks a boundary when it queues
    it; a GPU-bound step runs at most a queue's depth later, so a sample may land one step early: a throttled step
    is marked, never moved."""
    clocks, throttled = [], []
    for start, end in windows:
        inside = [s for s in samples if start <= s.get("t", -1.0) <= end]
        sm = [s["sm_clock_mhz"] for s in inside if s.get("sm_clock_mhz") is not None]
        clocks.append(min(sm) if sm else None)
        throttled.append(any(s.get("reasons") is not None and decode_reasons(s["reasons"], names) - BENIGN_REASONS
                             for s in inside))
    return StepClocks(clocks, throttled)


def device_memory_used_bytes(device: torch.device) -> int | None:
    """The device's used memory now (NVML, every process), or None off CUDA or without NVML. Read it before this
    process allocates on the GPU and pass it to `GpuSampler(baseline_used_bytes=...)`."""
    if device.type != "cuda":
        return None
    try:
        with _nvml() as nvml:
            handle, _ = nvml_handle(nvml, device)
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def _cuda_version(version: int) -> str:
    """NVML's integer CUDA version (12080) as text ("12.8")."""
    return f"{version // 1000}.{version % 1000 // 10}"


def gpu_fingerprint(torch_device: torch.device) -> dict:
    """The GPU's identity and configuration: name, UUID, driver and CUDA driver versions, power limits (W), SM and
    memory clocks (MHz: default, current, max, application), persistence and ECC modes, compute capability. {} off
    CUDA; fields NVML cannot give are listed under "nvml_errors"."""
    if torch_device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(torch_device)
    info: dict[str, Any] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                            "total_memory_gib": props.total_memory / GIB, "sm_count": props.multi_processor_count,
                            "torch_cuda": torch.version.cuda}
    try:
        with _nvml() as nvml:
            handle, info["nvml_device"] = nvml_handle(nvml, torch_device)
            errors: dict[str, str] = {}

            def read(key: str, get: Callable[[], Any]) -> None:
                try:
                    info[key] = get()
                except nvml.NVMLError as error:
                    errors[key] = str(error)

            read("uuid", lambda: nvml.nvmlDeviceGetUUID(handle))
            read("driver_version", nvml.nvmlSystemGetDriverVersion)
            read("cuda_driver_version", lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion_v2()))
            read("power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0)
            read("enforced_power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
            read("default_power_limit_w", lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0)
            for clock, kind in (("sm", nvml.NVML_CLOCK_SM), ("mem", nvml.NVML_CLOCK_MEM)):
                read(f"{clock}_clock_default_mhz", lambda k=kind: nvml.nvmlDeviceGetDefaultApplicationsClock(handle, k))
                read(f"{clock}_clock_application_mhz", lambda k=kind: nvml.nvmlDeviceGetApplicationsClock(handle, k))
                read(f"{clock}_clock_current_mhz", lambda k=kind: nvml.nvmlDeviceGetClockInfo(handle, k))
                read(f"{clock}_clock_max_mhz", lambda k=kind: nvml.nvmlDeviceGetMaxClockInfo(handle, k))
            read("persistence_mode", lambda: bool(nvml.nvmlDeviceGetPersistenceMode(handle)))
            read("ecc_mode", lambda: dict(zip(("current", "pending"), map(bool, nvml.nvmlDeviceGetEccMode(handle)))))
            read("mig_mode", lambda: bool(nvml.nvmlDeviceGetMigMode(handle)[0]))
            if errors:
                info["nvml_errors"] = errors
    except Exception as error:
        info["nvml_error"] = f"{type(error).__name__}: {error}"
    return info
