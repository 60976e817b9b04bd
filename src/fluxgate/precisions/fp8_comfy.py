"""`fp8-scaled@comfy`: the fp8-scaled file run the way ComfyUI runs scaled / mixed fp8 files, through comfy-kitchen.

ComfyUI (comfy/ops.py `mixed_precision_ops.Linear.forward`, comfy/quant_ops.py) keeps each quantized linear's weight
as a comfy-kitchen `QuantizedTensor` in `TensorCoreFP8Layout`: float8_e4m3fn `[N, K]` with ONE fp32 scale per tensor
(`weight_scale`). Each call reshapes the input to 2-D `[M, K]` and quantizes it with the file's static `input_scale`
(1.0 when the file has none: no amax): `x / scale`, clamped to +-448, cast to float8_e4m3fn (comfy-kitchen
`quantize_per_tensor_fp8`). `F.linear` on the two quantized tensors runs comfy-kitchen's FP8 linear, the GEMM
`scaled_mm_v2`: `torch.nn.functional.scaled_mm` where torch has it (`aten::_scaled_mm_v2`), else `torch._scaled_mm`,
tensor-wise scales, `use_fast_accum=False`. comfy-kitchen falls back to dequantize -> bf16 GEMM (with a warning) when
that GEMM raises; the kernel path shows it.

Here the file is loaded as `fp8-scaled` (diffusers' `BFLFP8RLinear`: fp8 weight, per-row scale `[N]`) and
`transform` swaps each such layer for a `ComfyFP8Linear`. A ComfyUI per-tensor file, as the real profile loads it
(`weights.layouts`: the scalar repeated per row), keeps its exact numbers. The tiny and synthetic profiles write this
backend its own such file (`per_tensor_fp8r_tensors`, quantized once from bf16 by comfy-kitchen, as ComfyUI's users'
files are), not the per-row fp8-scaled one: re-quantizing per-row numbers to one scale per tensor would add a second
rounding (on 3072-wide random weights, relative error 0.037 against 0.026 for either scheme alone). A user's per-row
file (BFL fp8r) in the real profile's slot is still re-quantized that way (amax / 448). A file's static
`input_scale` (ComfyUI's, or legacy `scale_input`) reaches the loaded layer (`fp8_scaled.keep_fp8r_input_scales`)
and quantizes the inputs here, as in ComfyUI; without one it is 1.0. A layer
ComfyUI runs in full precision (`full_precision_matrix_mult` in its ComfyUI config, or every layer of a legacy file
whose `scaled_fp8` marker has two elements; `fp8_scaled.keep_full_precision_marks`) keeps its fp8 weight and, each
call, dequantizes it to bf16 for a bf16 GEMM (ComfyUI's `forward_comfy_cast_weights`): its inputs are not quantized,
and the kernel path counts it apart from the FP8 GEMM's layers, not as a fallback.

Where it runs: CUDA devices with FP8 tensor cores (compute capability 8.9+, comfy-kitchen's
`TensorCoreFP8Layout.MIN_SM_VERSION`) and CPUs (comfy-kitchen's eager backend; torch's CPU `scaled_mm` computes
the FP8 GEMM in software: a correctness path, not a fast one). As in ComfyUI by default, comfy-kitchen's CUDA
backend is disabled unless torch is built for CUDA 13+ and its Triton backend is off; its eager backend then
quantizes.
"""

from __future__ import annotations

import torch
import comfy_kitchen
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout

from fluxgate.precisions.fp8_scaled import FORMAT as FP8R
from fluxgate.precisions.spec import (DTYPE, FULL_PRECISION_KEY, FastGemm, PrecisionFormat, StateDict, require_finite,
                                     safetensors_writer, swap_layers)

LAYOUT = "TensorCoreFP8Layout"  # comfy-kitchen's registered name of its per-tensor FP8 layout
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_TENSORWISE_GEMM = "fp8 GEMM per-tensor, no fast accum (comfy-kitchen scaled_mm_v2)"
GEMM_OPS = ("aten::_scaled_mm_v2", "aten::_scaled_mm")  # torch.nn.functional.scaled_mm, torch._scaled_mm


class ComfyFP8Linear(torch.nn.Module):
    """A linear over a comfy-kitchen FP8 `QuantizedTensor` weight `[N, K]` (one fp32 scale) and a static fp32
    `input_scale` (a scalar): ComfyUI's mixed-precision forward (module docstring)."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None, input_scale: torch.Tensor,
                 full_precision_matrix_mult: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("input_scale", input_scale)
        self.full_precision_matrix_mult = full_precision_matrix_mult  # dequantize -> bf16 GEMM, as the file asks

    @property
    def runs_full_precision(self) -> bool:
        """Whether this layer runs a bf16 GEMM by the file's choice (`measuring.kernels`: not a fallback)."""
        return self.full_precision_matrix_mult

    @classmethod
    def from_fp8r(cls, layer: torch.nn.Module, compute_dtype: torch.dtype) -> "ComfyFP8Linear":
        """From a loaded `BFLFP8RLinear` (e4m3 `weight` `[N, K]`, fp32 `weight_scale` `[N]`): its weight as is when
        every row has one scale, else re-quantized to one scale per tensor (a full-precision layer too: its bf16 GEMM
        then sees that one more rounding). Its `input_scale` (the file's static activation scale,
        `fp8_scaled.keep_fp8r_input_scales`), else 1.0; its `full_precision_matrix_mult` mark
        (`fp8_scaled.keep_full_precision_marks`), else False."""
        weight, row_scale = layer.weight.detach(), layer.weight_scale.detach().float()
        if bool((row_scale == row_scale[0]).all()):
            params = TensorCoreFP8Layout.Params(scale=row_scale[0].clone(), orig_dtype=compute_dtype,
                                                orig_shape=tuple(weight.shape))
            quantized = QuantizedTensor(weight, LAYOUT, params)
        else:
            values = weight.float() * row_scale[:, None]
            scale = (values.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            quantized = QuantizedTensor.from_float(values.to(compute_dtype), LAYOUT, scale=scale)
        input_scale = getattr(layer, "input_scale", None)
        input_scale = torch.ones((), device=weight.device) if input_scale is None else input_scale.detach()
        return cls(quantized, layer.bias, input_scale.float().reshape(()),
                   bool(getattr(layer, FULL_PRECISION_KEY, False)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.full_precision_matrix_mult:
            return torch.nn.functional.linear(inputs, self.weight.dequantize().to(inputs.dtype), self.bias)
        flat = inputs.reshape(-1, self.in_features)
        quantized = QuantizedTensor.from_float(flat, LAYOUT, scale=self.input_scale)
        output = torch.nn.functional.linear(quantized, self.weight, self.bias)
        return output.reshape(*inputs.shape[:-1], self.out_features)


def _comfyui_backends() -> None:
    """comfy-kitchen's backends as ComfyUI sets them by default (comfy/quant_ops.py at Comfy-Org/ComfyUI 0271a469;
    later versions may differ, e.g. on ROCm): its CUDA kernels only with a torch built for CUDA 13+, its Triton
    backend off ("an opt-in override, off by default on every platform", `--enable-triton-backend`); the eager
    backend serves what is left."""
    cuda = torch.version.cuda
    if cuda is None or tuple(int(part) for part in cuda.split(".")[:2]) < (13,):
        comfy_kitchen.registry.disable("cuda")
    comfy_kitchen.registry.disable("triton")


def to_comfy(transformer: torch.nn.Module) -> torch.nn.Module:
    """Swap every fp8-scaled linear of `transformer` for a `ComfyFP8Linear`, in place."""
    _comfyui_backends()
    return swap_layers(transformer, FP8R.quantized, lambda layer: ComfyFP8Linear.from_fp8r(layer, DTYPE))


def unavailable(device: torch.device) -> str | None:
    """Why `device` cannot run comfy-kitchen's FP8 GEMM: a CUDA device below compute capability 8.9."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < TensorCoreFP8Layout.MIN_SM_VERSION:
        need = ".".join(map(str, TensorCoreFP8Layout.MIN_SM_VERSION))
        return (f"comfy-kitchen's FP8 GEMM needs FP8 tensor cores (compute capability {need}+); this GPU is "
                f"{capability[0]}.{capability[1]}")
    return None


def per_tensor_fp8r_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear as a ComfyUI fp8 file holds it, quantized once from `weight` `[N, K]` by comfy-kitchen
    (`TensorCoreFP8Layout.quantize` with `scale="recalculate"`, what ComfyUI's `set_weight` does: one fp32 scale per
    tensor, amax / 448, e4m3 values), in diffusers' fp8r layout as `weights.layouts` reads a ComfyUI file (the scale
    repeated per row: e4m3 `weight` `[N, K]`, fp32 `weight_scale` `[N]`). Raises FixtureError for NaN or infinite
    values."""
    require_finite(f"{prefix}.weight", weight)
    _comfyui_backends()
    qdata, params = TensorCoreFP8Layout.quantize(weight, scale="recalculate")
    scale = params.scale.float().reshape(()).expand(weight.shape[0]).contiguous()
    return {f"{prefix}.weight": qdata, f"{prefix}.weight_scale": scale}


# Its own file in the generated profiles (`BackendSpec.own_file`): ComfyUI's per-tensor numbers, loaded by diffusers'
# BFL fp8r loader like the fp8-scaled file, then swapped for ComfyFP8Linear (which keeps them exactly).
FORMAT = PrecisionFormat(write=safetensors_writer(per_tensor_fp8r_tensors), layout=per_tensor_fp8r_tensors,
                         quantization_config=FP8R.quantization_config, transform=to_comfy,
                         quantized_layer=ComfyFP8Linear, unavailable=unavailable,
                         fast_gemm=FastGemm(FP8_TENSORWISE_GEMM, lambda name: name in GEMM_OPS))
