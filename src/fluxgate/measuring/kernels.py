"""Which GEMM path a combo's quantized linear layers actually ran, from a profile of one denoising step.

diffusers' quantized linears pick their path at run time: `BFLFP8RLinear` runs `torch._scaled_mm` on CUDA compute
capability 8.9+ (and dequantizes elsewhere), `BFLNVFP4Linear` runs FlashInfer's FP4 GEMM only on compute capability 10+
with FlashInfer installed, and `GGUFLinear` always dequantizes (with or without its CUDA dequantize kernels). A
dequantize fallback is correct but slow, so the gate shows which path ran next to the it/s it explains. Which layer
class is quantized, and which op or kernel names are a precision's own GEMM, each precision's spec says
(`PrecisionFormat.quantized`, `PrecisionFormat.fast_gemm`); this module profiles and counts.

The profile runs after a combo's timed images, so it never touches their times; but torch's profiler (Kineto) keeps
NVIDIA's CUPTI attached to the process after it stops unless `TEARDOWN_CUPTI=1` (pytorch/pytorch#144455), and
attached CUPTI adds a callback to every CUDA API call of every later combo. `configure_profiler_teardown` makes the
profiler detach it on exit. torch itself sets it back to "0" where CUDA graphs meet CUDA < 12.6 (no fluxgate compile
mode uses CUDA graphs), so each combo's kernel path records what held at its own profile (`cupti_teardown`).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from fluxgate.measuring.flops import TransformerCall, capture_transformer_calls
from fluxgate.models import denoiser_of
from fluxgate.precisions import PRECISIONS, backend_specs, installed
from fluxgate.precisions.spec import FULL_PRECISION_KEY

GEMM_OPS = ("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")
# Substrings of CUDA GEMM kernel names: cuBLAS (`sm90_xmma_gemm_*`, `nvjet_*`), CUTLASS (torch's row-wise fp8
# `_scaled_mm`), FlashInfer FP4; for the record next to the op counts (with every precision's `fast_gemm` ops).
GEMM_KERNEL_MARKS = ("gemm", "nvjet", "xmma", "cutlass", "e4m3", "f8f8", "fp4", "e2m1")
# CUDA runtime calls that make the host wait for the GPU. One inside a step drains the GPU's queue, and the GPU then
# idles while the host launches what follows: such a step's time follows the host CPU's speed.
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
# The profiled step's transformer calls; syncs outside this range (the profiler's own, at its exit) are not the step's.
STEP_RANGE = "fluxgate::step"
# Kineto's switch, read at each profile: "1" = call cuptiFinalize when a profile stops; unset, CUPTI stays attached.
CUPTI_TEARDOWN_ENV = "TEARDOWN_CUPTI"
BF16_GEMM = "bf16 GEMM"
DEQUANT_FALLBACK = "dequantize -> bf16 GEMM (fallback)"


@dataclass
class KernelPath:
    """The GEMM path of one combo's transformer over one denoising step."""

    precision: str
    label: str  # BF16_GEMM, a precision's `fast_gemm.label` or DEQUANT_FALLBACK, with a note when only part fell back
    fallback: bool  # quantized weights ran (some or all of) their GEMMs as dequantize -> bf16 GEMM
    op_counts: dict[str, int]  # GEMM-family aten ops (and FP4 ops) -> calls in the step
    quantized_linears: int  # quantized linear modules in the transformer
    quantized_linear_calls: int = 0  # their forward calls in the step (full-precision ones not counted)
    full_precision_linears: int = 0  # quantized linears that run a bf16 GEMM by the file's choice (ComfyUI's
    #  `full_precision_matrix_mult`, a layer's `runs_full_precision`): neither a fast GEMM nor a fallback
    quantized_kinds: dict[str, int] = field(default_factory=dict)  # module class -> count
    gpu_gemm_kernels: dict[str, int] = field(default_factory=dict)  # CUDA GEMM kernel name -> launches (CUDA only)
    method: str = "profiler"  # "profiler", or "dispatch" when torch.profiler failed and aten ops were counted
    host_syncs_per_step: int | None = None  # CUDA, profiler: host waits for the GPU inside STEP_RANGE (HOST_SYNC_CALLS)
    cupti_teardown: bool | None = None  # CUDA, profiler: this profile detached CUPTI when it stopped

    def to_json(self) -> dict:
        return asdict(self)


class _OpCounter(TorchDispatchMode):
    """Counts aten ops as they are dispatched (after composite ops such as linear decompose into mm / addmm)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket).replace(".", "::", 1)] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(events) -> int:
    """How often the profiled step made the host wait for the GPU: CUDA runtime calls in HOST_SYNC_CALLS within the
    STEP_RANGE range of `events` (torch.profiler's FunctionEvents)."""
    steps = [event.time_range for event in events if event.name == STEP_RANGE]
    return sum(1 for event in events if event.name in HOST_SYNC_CALLS
               and any(step.start <= event.time_range.start and event.time_range.end <= step.end for step in steps))


def configure_profiler_teardown() -> bool:
    """Make every kernel-path profile detach CUPTI when it stops, unless the environment says otherwise (it wins,
    with a warning); returns whether profiles detach it. On the H100, FLUX.1-dev's combos measured after an earlier
    combo's profile with CUPTI left attached ran their nvfp4 steps with 3.1 % step CV (1.2-2.0 % detached) and
    once had ten fp8 steps in a row 20-35 % slow (README, "Step-time noise")."""
    given = os.environ.get(CUPTI_TEARDOWN_ENV)
    if not given:  # unset or empty: Kineto's default, which keeps CUPTI
        os.environ[CUPTI_TEARDOWN_ENV] = "1"
    elif given != "1":
        warnings.warn(f"{CUPTI_TEARDOWN_ENV}={given} is set in the environment: CUPTI stays attached after each "
                      "combo's kernel-path profile and adds a callback to every CUDA call of the combos measured "
                      "after it (CUDA runs record cupti_teardown false)", stacklevel=2)
    return profiler_teardown()


def profiler_teardown() -> bool:
    """Whether this process's profiles detach CUPTI when they stop (history records carry it: `cupti_teardown`)."""
    return os.environ.get(CUPTI_TEARDOWN_ENV) == "1"


def _run_step(transformer: torch.nn.Module, calls: list[TransformerCall], device: torch.device) -> None:
    with torch.inference_mode(), record_function(STEP_RANGE):
        for args, kwargs in calls:
            transformer(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiled_counts(transformer, calls, device) -> tuple[dict[str, int], dict[str, int], str, int | None]:
    """(CPU-side op name -> calls, CUDA kernel name -> launches, method, host syncs inside the step) over the step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with warnings.catch_warnings():  # torch 2.11's note on every CUDA profile: this one has a single cycle
            warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle",
                                    category=UserWarning)
            with profile(activities=activities) as prof:
                _run_step(transformer, calls, device)
    except RuntimeError:  # e.g. the profiler cannot start in this process; count dispatched aten ops instead
        with _OpCounter() as counter:
            _run_step(transformer, calls, device)
        return dict(counter.counts), {}, "dispatch", None
    cpu_ops, kernels = Counter(), Counter()
    for event in prof.key_averages():
        is_kernel = event.device_type == torch.autograd.DeviceType.CUDA
        (kernels if is_kernel else cpu_ops)[event.key] += event.count
    return dict(cpu_ops), dict(kernels), "profiler", host_syncs(prof.events()) if device.type == "cuda" else None


def _classify(precision: str, quantized_linears: int, quantized_calls: int,
              fast_calls: dict[str, int]) -> tuple[str, bool]:
    """(label, fallback) from the layer count, their calls in the step, and the calls of each precision's fast GEMM
    ({label: calls}, the combo's own precision first, then in `PRECISIONS` order) among them. The first GEMM that
    ran names the path, and only its calls count against the quantized layers' calls: two precisions' GEMMs may
    match the same op (`aten::_scaled_mm`), and counting it twice would hide a partial fallback."""
    if quantized_linears == 0:
        if not PRECISIONS[precision].implementation.quantizes:
            return BF16_GEMM, False
        return f"{BF16_GEMM} (no quantized layers: weights dequantized at load)", True
    ran = {label: calls for label, calls in fast_calls.items() if calls}
    if not ran:
        return DEQUANT_FALLBACK, True
    label = next(iter(ran))
    fast_calls_total = ran[label]
    if fast_calls_total < quantized_calls:
        return f"{label}; dequantize fallback in {quantized_calls - fast_calls_total} of {quantized_calls} calls", True
    return label, False


def kernel_path(pipe, call_kwargs: dict, precision_name: str, *,
                calls: list[TransformerCall] | None = None, backend: str = "") -> KernelPath:
    """Profile one denoising step of `pipe.transformer` (CPU and, on CUDA, kernel activity) and name the GEMM path
    its quantized linears ran (`backend`: the combo's, "" for the precision's default). `calls` reuses inputs from
    `flops.capture_transformer_calls`."""
    calls = capture_transformer_calls(pipe, call_kwargs) if calls is None else calls
    transformer = denoiser_of(pipe)
    device = next(transformer.parameters(), torch.empty(0)).device
    # the combo's own precision and backend first: its fast GEMM names the path when another's matches the same op
    own = (precision_name, backend or PRECISIONS[precision_name].backend)
    specs = sorted(installed([*PRECISIONS.values(), *backend_specs()]),
                   key=lambda spec: (spec.name, spec.backend) != own)
    formats = [spec.implementation for spec in specs]
    fast_gemms = [form.fast_gemm for form in formats if form.fast_gemm is not None]
    quantized = [module for module in transformer.modules() if any(form.quantized(module) for form in formats)]
    full_precision = [module for module in quantized if getattr(module, "runs_full_precision", False)]
    promised = [module for module in quantized if module not in full_precision]  # a fast GEMM is asked of these
    quantized_calls = 0

    def count_call(module, args):
        nonlocal quantized_calls
        quantized_calls += 1

    handles = [module.register_forward_pre_hook(count_call) for module in promised]
    try:
        cpu_ops, kernels, method, syncs = _profiled_counts(transformer, calls, device)
    finally:
        for handle in handles:
            handle.remove()

    op_counts = {name: count for name, count in cpu_ops.items()
                 if name in GEMM_OPS or any(gemm.matches(name) for gemm in fast_gemms)}
    gemm_kernels = {name: count for name, count in kernels.items()
                    if any(mark in name.lower() for mark in GEMM_KERNEL_MARKS)}
    # A fast GEMM shows as a CPU-side op where it is a torch op (torch._scaled_mm), else only as its kernels
    # (FlashInfer's FP4 GEMM where it is no torch op).
    fast_calls = {gemm.label: sum(c for n, c in op_counts.items() if gemm.matches(n))
                  or sum(c for n, c in gemm_kernels.items() if gemm.matches(n)) for gemm in fast_gemms}
    label, fallback = _classify(precision_name, len(promised), quantized_calls, fast_calls)
    if full_precision:
        label = (f"{BF16_GEMM} ({len(full_precision)} quantized linears dequantized as the file asks: "
                 f"{FULL_PRECISION_KEY})" if len(full_precision) == len(quantized) else
                 f"{label}; {len(full_precision)} of {len(quantized)} quantized linears dequantized -> {BF16_GEMM} as "
                 f"the file asks ({FULL_PRECISION_KEY})")
        fallback = fallback and len(full_precision) < len(quantized)
    return KernelPath(precision=precision_name, label=label, fallback=fallback, op_counts=op_counts,
                      quantized_linears=len(quantized), quantized_linear_calls=quantized_calls,
                      full_precision_linears=len(full_precision),
                      quantized_kinds=dict(Counter(type(module).__name__ for module in quantized)),
                      gpu_gemm_kernels=gemm_kernels, method=method, host_syncs_per_step=syncs,
                      cupti_teardown=profiler_teardown() if device.type == "cuda" and method == "profiler" else None)
