"""Device memory hygiene between combos: what a combo leaves behind, and what an out-of-memory combo needed.

Every combo starts from the memory state the one before it found: the runner snapshots device memory before it builds
the combo's transformer and again after tearing the combo down, and the record carries both (`teardown`). A CUDA
out-of-memory error fails that combo only, with how much it needed against what the GPU has; its memory is released
after the exception (and the frames holding its tensors) is gone, so the next combo starts clean.
"""

from __future__ import annotations

import gc
import os
import re
import warnings
from dataclasses import dataclass

import torch

from fluxgate.environ import ALLOC_CONF_ENV, DEFAULT_ALLOC_CONF  # noqa: F401 - re-exported
from fluxgate.errors import FluxgateError
from fluxgate.measuring import telemetry

GIB = 1024**3
# DEFAULT_ALLOC_CONF is torch's own allocator settings. Tried on the device H100 for FLUX.1-dev eager fp8-scaled,
# whose steps spike: `expandable_segments:True` gave step CV 0.29 % in one process but 8.4, 5.7 and 6.7 % over three
# full runs (and 4.5/6.4/2.4 % vs 8.1/5.4/2.3 % without it in three pairs), so it is not the default; the setting is
# recorded with every run and runs with different settings are not compared.
LEAK_TOLERANCE = 0.01  # teardown may leave at most 1 % more device memory in use than before the combo


class OutOfMemory(FluxgateError):
    """A combo ran out of device memory; `needed_gib` is a lower bound (in use at the failure + the request)."""

    def __init__(self, message: str, needed_gib: float, total_gib: float):
        super().__init__(message)
        self.needed_gib, self.total_gib = needed_gib, total_gib


def configure_allocator(conf: str) -> str:
    """Set torch's CUDA caching-allocator settings for this process unless the environment already sets them;
    returns the settings in force ("default" = torch's own). Must run before CUDA is initialized: torch reads them
    once, at its first CUDA allocation."""
    given = os.environ.get(ALLOC_CONF_ENV)
    if conf != DEFAULT_ALLOC_CONF and given and given != conf:
        warnings.warn(f"--cuda-alloc-conf {conf} not applied: {ALLOC_CONF_ENV}={given} is set in the environment "
                      "and wins", stacklevel=2)
    elif conf != DEFAULT_ALLOC_CONF:
        os.environ[ALLOC_CONF_ENV] = conf
    return allocator_settings()


def allocator_settings() -> str:
    """The CUDA caching-allocator settings this process runs with ("default" = torch's own)."""
    return os.environ.get(ALLOC_CONF_ENV) or DEFAULT_ALLOC_CONF


@dataclass(frozen=True)
class Snapshot:
    """Device memory in use at one moment: torch's allocated and reserved bytes, NVML's used bytes (every process)."""

    allocated: int
    reserved: int
    used: int | None  # NVML; None without NVML

    @classmethod
    def take(cls, device: torch.device) -> "Snapshot | None":
        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        return cls(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device),
                   telemetry.device_memory_used_bytes(device))


def cuda_index(device: torch.device) -> int:
    """The CUDA device number of `device` ("cuda" means the current device)."""
    return torch.cuda.current_device() if device.index is None else device.index


_frozen = False


def freeze_imports() -> None:
    """Once per process, before its first pipeline: collect the garbage, then move every object still tracked (the
    imported libraries' modules, classes and functions, ~430 k objects with torch, diffusers and transformers) into
    the collector's permanent generation (`gc.freeze`). Each full collection after it (`release`, between combos;
    pytest's at exit) walks only the objects made since: 0.24 s -> microseconds on a 2-core CPU, a second or more
    per run of a few combos. Nothing made later is frozen: a released pipeline's reference cycles are still
    collected."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True


def release(device: torch.device) -> None:
    """Free everything unreferenced: Python garbage, cuBLAS workspaces, the caching allocator's free blocks; on a
    CPU also the C heap's free pages (`trim_heap`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        torch.cuda.empty_cache()
    else:
        trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`; nothing elsewhere). A CPU's peak
    memory is the process's resident set, which otherwise keeps the high-water mark of earlier work: an A/B worker
    that judged one combo's case images carried ~10 % more RSS into the next combo's images than the other side,
    and its memory ratio failed on that alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def teardown(before: Snapshot | None, after: Snapshot | None) -> dict | None:
    """The record's `teardown` entry (GiB): torch's allocated and reserved memory and NVML's used memory before the
    combo and after its teardown. `clean`: device memory in use (NVML's used, else torch's reserved) is within
    LEAK_TOLERANCE of before."""
    if before is None or after is None:
        return None
    entry = {f"{kind}_{when}_gib": getattr(snapshot, kind) / GIB
             for kind in ("allocated", "reserved") for when, snapshot in (("before", before), ("after", after))}
    if before.used is not None and after.used is not None:
        entry.update(used_before_gib=before.used / GIB, used_after_gib=after.used / GIB)
        entry["clean"] = after.used <= (1 + LEAK_TOLERANCE) * before.used
    else:
        entry["clean"] = after.reserved <= (1 + LEAK_TOLERANCE) * before.reserved
    return entry


_TRIED = re.compile(r"Tried to allocate ([\d.]+) (KiB|MiB|GiB)")
_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": GIB}


def out_of_memory(error: torch.OutOfMemoryError, device: torch.device, combo_id: str,
                  before: Snapshot | None) -> OutOfMemory:
    """The one-line error for a combo that ran out of memory. Call it inside the `except` block, while the tensors
    that filled the device are still alive: the need is what was allocated then plus the failed request."""
    match = _TRIED.search(str(error))
    tried = float(match.group(1)) * _UNITS[match.group(2)] if match else 0
    needed = (torch.cuda.memory_allocated(device) + tried) / GIB
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    notes = [] if before is None or before.used is None else [f"{total - before.used / GIB:.1f} GiB free at the start"]
    fraction = torch.cuda.get_per_process_memory_fraction(cuda_index(device))
    if fraction < 1:
        notes.append(f"this process is capped at {fraction * total:.1f} GiB by set_per_process_memory_fraction")
    notes = f" ({'; '.join(notes)})" if notes else ""
    return OutOfMemory(f"{combo_id}: CUDA out of memory: needs more than {needed:.1f} GiB, the GPU has {total:.1f} "
                       f"GiB{notes}", needed, total)
