"""`torchao-fp8-row`: torchao's fp8 dynamic row-wise quantization, applied to a loaded bf16 denoiser (a
load-then-transform `PrecisionFormat`; its spec's `file_precision` is "bf16").

`quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))` replaces the weight of every
`nn.Linear` whose in and out features are multiples of 16 (torchao's `_fp8_mm_compat`; others keep bf16) by a
`torchao.quantization.Float8Tensor`: `qdata` float8_e4m3fn `[N, K]` and `scale` float32 `[N, 1]` (row amax / 448).
The layer stays an `nn.Linear`, so it is recognised by its weight's class (`is_quantized`). At run time each input is
quantized per row (`[M, K]` e4m3 with a `[M, 1]` scale) and the product runs as `torch._scaled_mm` (torchao 0.18
`float8_tensor.py`, kernel preference AUTO), or as `mslk::f8f8bf16_rowwise` where the mslk package is installed on
compute capability 9.0+.

Where it runs (torchao 0.18 `float8/inference.py` `_check_hardware_support`): CUDA compute capability 8.9+ (Ada,
Hopper, Blackwell), AMD MI300/MI350, Intel XPU. On a CPU `quantize_` refuses (an AssertionError), although torch's
CPU `_scaled_mm` exists; `unavailable` turns that into a skip with the reason.
"""

from __future__ import annotations

import torch
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_
from torchao.utils import is_MI300, is_MI350

from fluxgate.precisions.spec import FastGemm, PrecisionFormat

FP8_GEMM = "fp8 GEMM (torchao row-wise, _scaled_mm)"
# The CPU-side ops torchao's Float8Tensor linear dispatches to (float8_tensor.py `_float8_linear_impl`).
FP8_GEMM_OPS = ("aten::_scaled_mm", "mslk::f8f8bf16_rowwise")
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0)


def config() -> Float8DynamicActivationFloat8WeightConfig:
    """fp8 (E4M3) weights and activations, both scaled per row."""
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def transform(denoiser: torch.nn.Module) -> None:
    """Quantize `denoiser`'s linear layers in place (module docstring). Its weights must be bfloat16, as fluxgate
    loads them."""
    quantize_(denoiser, config())


def is_quantized(module: torch.nn.Module) -> bool:
    """`module` is a linear layer whose weight torchao quantized to fp8."""
    return isinstance(module, torch.nn.Linear) and isinstance(module.weight, Float8Tensor)


def unavailable(device: torch.device) -> str | None:
    """Why torchao 0.18 cannot run fp8 dynamic row-wise quantization on `device`; None where it can."""
    if device.type == "cuda":
        if torch.version.hip is not None:
            return None if (is_MI300() or is_MI350()) else "torchao's fp8 on ROCm needs an MI300 or MI350"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                    "fp8 GEMMs need 8.9+ (Ada, Hopper, Blackwell)")
        return None
    if device.type == "xpu":
        return None
    return (f"torchao's Float8DynamicActivationFloat8WeightConfig quantizes only for CUDA compute capability 8.9+, "
            f"MI300+ or XPU (torchao 0.18 refuses a {device.type} device)")


FORMAT = PrecisionFormat(transform=transform, is_quantized=is_quantized, unavailable=unavailable,
                         fast_gemm=FastGemm(FP8_GEMM, lambda name: name in FP8_GEMM_OPS))
