"""`torchao-fp8-row`: torchao's fp8 dynamic row-wise quantization, applied to a loaded bf16 denoiser (a
load-then-transform `PrecisionFormat`; its spec's `file_precision` is "bf16").

`quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))` replaces the weight of every
`nn.Linear` whose in and out features are multiples of 16 (torchao's `_fp8_mm_compat`; others keep bf16) by a
`torchao.quantization.Float8Tensor`: `qdata` float8_e4m3fn `[N, K]` and `scale` float32 `[N, 1]` (row amax / 448).
The layer stays an `nn.Linear`, so it is recognised by its weight's class (`is_quantized`). At run time each input is
quantized per row (`[M, K]` e4m3 with a `[M, 1]` scale) and the product runs as `torch._scaled_mm` (torchao 0.18
`float8_tensor.py`, kernel preference AUTO), or as `mslk::f8f8bf16_rowwise` where the mslk package is installed on
compute capability 9.0+.

The configuration, the quantized-layer check, the hardware check and the kernel path are those of fluxgate's own
`fp8-scaled@torchao` backend (`fluxgate.precisions.fp8_torchao`); only the transform is this package's. Where it runs
(torchao 0.18 `float8/inference.py` `_check_hardware_support`): CUDA compute capability 8.9+ (Ada, Hopper,
Blackwell), AMD MI300/MI350, Intel XPU. On a CPU `quantize_` refuses (an AssertionError), although torch's
CPU `_scaled_mm` exists; `unavailable` turns that into a skip with the reason.
"""

from __future__ import annotations

import torch
from torchao.quantization import quantize_

from fluxgate.precisions.fp8_torchao import FORMAT as TORCHAO_FP8
from fluxgate.precisions.fp8_torchao import config
from fluxgate.precisions.spec import PrecisionFormat


def transform(denoiser: torch.nn.Module) -> None:
    """Quantize `denoiser`'s linear layers in place (module docstring). Its weights must be bfloat16, as fluxgate
    loads them."""
    quantize_(denoiser, config())


FORMAT = PrecisionFormat(transform=transform, is_quantized=TORCHAO_FP8.is_quantized,
                         unavailable=TORCHAO_FP8.unavailable, fast_gemm=TORCHAO_FP8.fast_gemm)
