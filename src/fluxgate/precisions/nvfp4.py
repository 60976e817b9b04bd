"""`nvfp4`: safetensors in NVIDIA ModelOpt's NVFP4 layout, loaded by diffusers' BFL quantizer into `BFLNVFP4Linear`.

Layout (diffusers `quantizers/bfl/utils.py`, `quantize_nvfp4`; ModelOpt's checkpoints): a quantized linear's `weight`
is uint8 `[N, K/2]` (two E2M1 values per byte, the even element in the low nibble), `weight_scale` float8_e4m3fn
`[N, K/16]` (one scale per block of 16 along K), fp32 scalars `weight_scale_2` (global scale) and `input_scale`;
everything else is bfloat16. `BFLNVFP4Linear` runs FlashInfer's FP4 GEMM on compute capability 10+ with FlashInfer
installed, and dequantizes to bf16 elsewhere.
"""

from __future__ import annotations

import torch
from diffusers import BFLQuantizationConfig
from diffusers.quantizers.bfl.utils import E2M1_MAX, FP8_MAX, NVFP4_BLOCK, BFLNVFP4Linear, quantize_nvfp4

from fluxgate.precisions.spec import FastGemm, PrecisionFormat, StateDict, require_finite, safetensors_writer

FP4_GEMM = "fp4 GEMM"


def _quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' NVFP4 quantizer, except that an all-zero weight (global scale 0, where it would divide 0/0 into NaN
    block scales) is stored as zero codes with zero scales, which dequantize to exact zeros."""
    if weight.abs().amax() == 0:
        rows, cols = weight.shape
        return (torch.zeros(rows, cols // 2, dtype=torch.uint8, device=weight.device),
                torch.zeros(rows, cols // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=weight.device),
                torch.zeros((), dtype=torch.float32, device=weight.device))
    return quantize_nvfp4(weight)


def nvfp4_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's tensors in the NVFP4 layout (module docstring), on the weight's device. Raises FixtureError for
    NaN or infinite values."""
    require_finite(f"{prefix}.weight", weight)
    weight_q, weight_scale, weight_scale_2 = _quantize_nvfp4(weight)
    # Not calibrated: only FP4 tensor-core kernels (Blackwell) read it; elsewhere diffusers dequantizes the weight
    # and ignores it. 1/(448*6) is the scale of activations with amax 1.
    input_scale = torch.tensor(1.0 / (FP8_MAX * E2M1_MAX), dtype=torch.float32, device=weight.device)
    return {f"{prefix}.weight": weight_q, f"{prefix}.weight_scale": weight_scale,
            f"{prefix}.weight_scale_2": weight_scale_2, f"{prefix}.input_scale": input_scale}


def _packed_shapes(layer: torch.nn.Linear) -> dict[str, tuple[int, ...]]:
    # diffusers puts nvfp4 tensors in place as they are, whatever their shape: checked by the loader
    return {"weight": (layer.out_features, layer.in_features // 2),
            "weight_scale": (layer.out_features, layer.in_features // NVFP4_BLOCK)}


def is_fp4_gemm(name: str) -> bool:
    """A profiled op or kernel name of an FP4 GEMM (FlashInfer's `mm_fp4`, cuBLAS/CUTLASS `*e2m1*gemm*` kernels)."""
    lower = name.lower()
    return ("fp4" in lower or "e2m1" in lower) and ("mm" in lower or "gemm" in lower)


FORMAT = PrecisionFormat(write=safetensors_writer(nvfp4_tensors),
                         quantization_config=lambda dtype: BFLQuantizationConfig(compute_dtype=dtype),
                         layout=nvfp4_tensors, quantized_layer=BFLNVFP4Linear, packed_shapes=_packed_shapes,
                         fast_gemm=FastGemm(FP4_GEMM, is_fp4_gemm))
