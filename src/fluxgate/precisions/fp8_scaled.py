"""`fp8-scaled`: safetensors in BFL's `fp8r` layout, loaded by diffusers' BFL quantizer into `BFLFP8RLinear`.

Layout (diffusers `quantizers/bfl/utils.py`, `quantize_fp8r`): a quantized linear's `weight` is float8_e4m3fn
`[N, K]` with an fp32 per-row `weight_scale` `[N]` (row amax / 448); everything else is bfloat16. `BFLFP8RLinear` runs
`torch._scaled_mm` on CUDA compute capability 8.9+ and dequantizes to bf16 elsewhere.

A file's static activation scale (`<layer>.input_scale`, fp32 `[]`: ComfyUI's, ModelOpt's FP8 export) is read by
diffusers' BFL quantizer but kept only on NVFP4 layers (diffusers 0.42 `BFLQuantizer.create_quantized_param`);
`keep_fp8r_input_scales`, installed when this module is imported, keeps it on each `BFLFP8RLinear` too, as the
buffer `input_scale`, which its own forward never reads (it scales each input row at run time) and the `comfy`
backend quantizes inputs with. The wrapper changes nothing else of diffusers' loading in the process.
"""

from __future__ import annotations

import torch
from diffusers import BFLQuantizationConfig
from diffusers.quantizers.bfl.bfl_quantizer import BFLQuantizer
from diffusers.quantizers.bfl.utils import BFLFP8RLinear, quantize_fp8r
from diffusers.utils import get_module_from_name

from fluxgate.precisions.spec import (FastGemm, PrecisionFormat, StateDict, require_finite, safetensors_writer,
                                     static_activation_scale)

FP8_GEMM = "fp8 GEMM per-row, fast accum (diffusers BFLFP8RLinear _scaled_mm)"


def fp8r_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's tensors in the fp8r layout (module docstring), on the weight's device. Raises FixtureError for
    NaN or infinite values."""
    require_finite(f"{prefix}.weight", weight)
    weight_q, weight_scale = quantize_fp8r(weight)
    return {f"{prefix}.weight": weight_q, f"{prefix}.weight_scale": weight_scale}


def _packed_shapes(layer: torch.nn.Linear) -> dict[str, tuple[int, ...]]:
    # diffusers puts fp8r tensors in place as they are, whatever their shape: checked by the loader
    return {"weight": (layer.out_features, layer.in_features), "weight_scale": (layer.out_features,)}


def keep_fp8r_input_scales() -> None:
    """Wrap diffusers' `BFLQuantizer.create_quantized_param` (once per process) so that an fp8r parameter's static
    activation scale lands on its `BFLFP8RLinear` as the buffer `input_scale` (fp32 `[]`, on the layer's device);
    NVFP4 layers and files without one are loaded exactly as diffusers loads them. The loader then raises
    ValueError naming the layer for a scale that is not one finite number above 0 (`spec.static_activation_scale`)."""
    create = BFLQuantizer.create_quantized_param
    if getattr(create, "keeps_fp8r_input_scale", False):
        return

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        create(self, model, param_value, param_name, target_device, *args, **kwargs)
        input_scale = getattr(param_value, "input_scale", None)
        module, _ = get_module_from_name(model, param_name)
        if input_scale is not None and isinstance(module, BFLFP8RLinear):
            scale = static_activation_scale(f"{param_name.removesuffix('.weight')}.input_scale", input_scale)
            module.register_buffer("input_scale", scale.to(target_device))

    create_quantized_param.keeps_fp8r_input_scale = True
    BFLQuantizer.create_quantized_param = create_quantized_param


keep_fp8r_input_scales()

FORMAT = PrecisionFormat(write=safetensors_writer(fp8r_tensors),
                         quantization_config=lambda dtype: BFLQuantizationConfig(compute_dtype=dtype),
                         layout=fp8r_tensors, quantized_layer=BFLFP8RLinear, packed_shapes=_packed_shapes,
                         fast_gemm=FastGemm(FP8_GEMM, lambda name: name == "aten::_scaled_mm"))
