"""`fp8-scaled@torchao`: the fp8-scaled file run the way a diffusers user runs fp8, through torchao.

diffusers users get fp8 from torchao (`TorchAoConfig("float8dq_e4m3_row")` or `quantize_` after loading): each
`nn.Linear` gets a `torchao.quantization.Float8Tensor` weight, float8_e4m3fn `[N, K]` with a float32 scale `[N, 1]`
(row amax / 448), and at run time each input is quantized per row (`[M, K]` e4m3, scale `[M, 1]`, dynamic: amax of
each row) before the GEMM, `torch._scaled_mm` with row-wise scales and fast accumulation (torchao 0.18
`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: `Float8MMConfig(use_fast_accum=True)` unless on
XPU; `mslk::f8f8bf16_rowwise` where the mslk package is installed on compute capability 9.0+).

Here the file is loaded as `fp8-scaled` (diffusers' `BFLFP8RLinear`: e4m3 weight `[N, K]`, per-row fp32 scale `[N]`)
and `transform` replaces each such layer, one at a time, by an `nn.Linear` holding the weight dequantized to bf16
and quantized by torchao's public `quantize_` with that config: BFL's per-row scale is row amax / 448 as torchao's
is, so each row comes back with its own scale and values up to bf16's rounding of the dequantized product. One layer
at a time keeps the load's peak at the fp8 model plus one bf16 layer. Layers whose features are not multiples of 16
are left in bf16 by torchao (`_fp8_mm_compat`), as a diffusers user's would be.

Where it runs (torchao 0.18 `float8/inference.py` `_check_hardware_support`): CUDA compute capability 8.9+ (Ada,
Hopper, Blackwell), AMD MI300/MI350 and Intel XPU; torchao refuses a CPU (an AssertionError in `quantize_` and in
the quantized linear), so on a CPU each `@torchao` item is a skip naming that.
"""

from __future__ import annotations

import torch
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_

from fluxgate.precisions.fp8_scaled import FORMAT as FP8R
from fluxgate.precisions.spec import DTYPE, FastGemm, PrecisionFormat, swap_layers

FP8_ROWWISE_GEMM = "fp8 GEMM per-row, fast accum (torchao _scaled_mm)"
GEMM_OPS = ("aten::_scaled_mm", "mslk::f8f8bf16_rowwise")  # torchao 0.18 float8_tensor.py `_float8_linear_impl`
MIN_CAPABILITY = (8, 9)


def config() -> Float8DynamicActivationFloat8WeightConfig:
    """E4M3 weights and activations, each scaled per row (the diffusers-torchao `float8dq_e4m3_row`)."""
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _as_torchao(layer: torch.nn.Module) -> torch.nn.Linear:
    """A loaded `BFLFP8RLinear` as an `nn.Linear` quantized by torchao (module docstring)."""
    weight = layer.weight.detach()
    dequantized = (weight.float() * layer.weight_scale.detach().float()[:, None]).to(DTYPE)
    linear = torch.nn.Linear(dequantized.shape[1], dequantized.shape[0], bias=layer.bias is not None,
                             device="meta", dtype=DTYPE)
    linear.weight = torch.nn.Parameter(dequantized, requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.detach().to(DTYPE), requires_grad=False)
    quantize_(linear, config())
    return linear


def to_torchao(transformer: torch.nn.Module) -> torch.nn.Module:
    """Swap every fp8-scaled linear of `transformer` for a torchao-quantized `nn.Linear`, in place."""
    return swap_layers(transformer, FP8R.quantized, _as_torchao)


def is_quantized(module: torch.nn.Module) -> bool:
    """`module` is a linear whose weight torchao quantized to fp8."""
    return isinstance(module, torch.nn.Linear) and isinstance(module.weight, Float8Tensor)


def unavailable(device: torch.device) -> str | None:
    """Why torchao 0.18 cannot run fp8 dynamic row-wise quantization on `device`; None where it can."""
    if device.type == "cuda":
        if torch.version.hip is not None:
            from torchao.utils import is_MI300, is_MI350

            return None if (is_MI300() or is_MI350()) else "torchao's fp8 on ROCm needs an MI300 or MI350"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"torchao's fp8 GEMM needs FP8 tensor cores (compute capability 8.9+); this GPU is "
                    f"{capability[0]}.{capability[1]}")
        return None
    if device.type == "xpu":
        return None
    return (f"torchao 0.18 quantizes fp8 dynamic row-wise only for CUDA compute capability 8.9+, MI300+ or XPU "
            f"(it refuses a {device.type} device)")


FORMAT = PrecisionFormat(transform=to_torchao, is_quantized=is_quantized, unavailable=unavailable,
                         fast_gemm=FastGemm(FP8_ROWWISE_GEMM, lambda name: name in GEMM_OPS))
