"""`nvfp4@fp8`: an NVFP4 file served on a GPU without FP4 tensor cores by converting its weights to FP8 at load.

Hopper (compute capability 9.0) has FP8 tensor cores but no FP4 ones: diffusers' `BFLNVFP4Linear` dequantizes the
whole weight to bf16 in every call there (the kernel path's "dequantize"), and the one faster route with published
evidence is to re-quantize the NVFP4 weights to FP8 once, at load, and run FP8 GEMMs (vLLM PR 38728, NVFP4 -> FP8
on H200: +62 % over its Marlin FP4 path).

`transform` replaces each loaded `BFLNVFP4Linear` (E2M1 codes `[N, K/2]`, E4M3 block scales `[N, K/16]`, fp32
`weight_scale_2`) by diffusers' `BFLFP8RLinear`: the weight dequantized exactly in fp32 (diffusers'
`dequantize_nvfp4`: code x block scale x global scale) and quantized per row to E4M3 (`quantize_fp8r`: row amax /
448), one layer at a time. The values are the file's up to E4M3's rounding of each product (3 mantissa bits: the
E2M1 codes times an E4M3 block scale can need more); the combo is judged in NVFP4's 4-bit tier against the same BF16
reference. The weight memory doubles (8 bits per value instead of 4, a scale per row instead of per 16 values): the
price of the FP8 GEMM, which the VRAM limit and the trade-off against BF16 show.

At run time `BFLFP8RLinear` quantizes each input per row and runs `torch._scaled_mm` with fast accumulation on CUDA
compute capability 8.9+, and dequantizes elsewhere (a CPU: correct, not fast; the kernel path says so).
"""

from __future__ import annotations

import torch
from diffusers.quantizers.bfl.utils import BFLFP8RLinear, BFLNVFP4Linear, dequantize_nvfp4, quantize_fp8r

from fluxgate.precisions.fp8_scaled import FORMAT as FP8R
from fluxgate.precisions.spec import DTYPE, PrecisionFormat, swap_layers


def _as_fp8r(layer: BFLNVFP4Linear) -> BFLFP8RLinear:
    """One loaded NVFP4 linear as an fp8r one on the same device (module docstring)."""
    values = dequantize_nvfp4(layer.weight.detach(), layer.weight_scale.detach(), layer.weight_scale_2.detach())
    weight, weight_scale = quantize_fp8r(values)
    del values
    fp8 = BFLFP8RLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=DTYPE,
                        device="meta")
    fp8.weight = torch.nn.Parameter(weight, requires_grad=False)
    fp8.weight_scale = weight_scale
    if layer.bias is not None:
        fp8.bias = torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
    return fp8


def to_fp8(transformer: torch.nn.Module) -> torch.nn.Module:
    """Swap every `BFLNVFP4Linear` of `transformer` for a `BFLFP8RLinear`, in place, one layer at a time."""
    return swap_layers(transformer, lambda layer: isinstance(layer, BFLNVFP4Linear), _as_fp8r)


FORMAT = PrecisionFormat(transform=to_fp8, quantized_layer=BFLFP8RLinear, fast_gemm=FP8R.fast_gemm)
